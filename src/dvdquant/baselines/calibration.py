"""Activation statistics for the baselines that need them (their *calibration*).

SmoothQuant and the ViDiT-Q-style method look at real activations: the user passes
``calibration``, a callable that runs forward passes of the model (e.g. a few denoising steps
on sample prompts). We record, per quantized layer, the per-input-channel absmax of its inputs —
per denoising step when ``per_step`` (the step index comes from the model's RuntimeState, which
the pipeline's step hook sets). DVD-Quant never calls this: it is data-free, which is the
point of the comparison (cost is reported as the number of forward passes needed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..nn.state import RuntimeState


@dataclass
class CalibrationStats:
    absmax: dict = field(default_factory=dict)   # layer name → {step: (K,) fp32 absmax}
    passes: int = 0                              # forward passes of the whole model

    def per_layer(self, name: str, per_step: bool = False) -> torch.Tensor:
        """(T, K) per-step absmax (T = number of steps seen) if ``per_step``, else (1, K) max over steps."""
        by_step = self.absmax.get(name)
        if not by_step:
            raise ConfigError(f"calibration never reached layer {name}: does `calibration` run the model?")
        keys = sorted(by_step)
        table = torch.stack([by_step[k] for k in keys])
        return table if per_step else table.amax(dim=0, keepdim=True)


def collect_input_absmax(model: nn.Module, targets: list, calibration: Optional[Callable],
                         state: RuntimeState, method_name: str) -> CalibrationStats:
    """Run ``calibration(model)`` with hooks on ``targets`` [(name, Linear)]; returns the stats."""
    if calibration is None:
        raise ConfigError(f"{method_name} needs activation statistics: pass calibration=fn(model) "
                          "that runs forward passes on sample inputs (DVD-Quant needs none)")
    stats = CalibrationStats()
    handles = []

    def make_hook(name):
        def hook(mod, args):
            x = args[0].detach()
            amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float().cpu()
            step = state.step_index or 0
            cur = stats.absmax.setdefault(name, {})
            cur[step] = amax if step not in cur else torch.maximum(cur[step], amax)
        return hook

    def count(mod, args, out):
        stats.passes += 1

    for name, lin in targets:
        handles.append(lin.register_forward_pre_hook(make_hook(name)))
    handles.append(model.register_forward_hook(count))
    try:
        with torch.no_grad():
            calibration(model)
    finally:
        for h in handles:
            h.remove()
    return stats
