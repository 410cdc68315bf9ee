"""Layer-level diagnostics: SQNR of every quantized Linear's output against the FP layer, per step.

While a quantized model samples, a forward hook on each :class:`~dvdquant.nn.QuantLinear`
recomputes ``F.linear(x, W_fp, b_fp)`` on the *same* input x the quantized layer received
(real activations of the quantized run) with the original FP weight, kept aside before
quantization, and accumulates signal ‖y_fp‖² and noise ‖y_q − y_fp‖² per (layer, denoising
step) on the device (no host sync per call). SQNR = 10·log10(signal / noise), summed over every
call of that layer at that step (all batches, CFG halves included).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..api import quantized_layers


def fp_linear_weights(transformer: nn.Module) -> dict:
    """{layer name: (W, b)} of the FP model's quantizable Linear layers (detached references)."""
    return {n: (m.weight.detach(), None if m.bias is None else m.bias.detach())
            for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}


class LayerSQNR:
    """Forward hooks on a quantized model's QuantLinears; ``result()`` gives per-step SQNR."""

    def __init__(self, qmodel: nn.Module, fp_weights: dict, steps: int):
        self.layers = [(n, m) for n, m in quantized_layers(qmodel) if n in fp_weights]
        self.names = [n for n, _ in self.layers]
        dev = next(qmodel.parameters()).device if any(True for _ in qmodel.parameters()) else "cpu"
        self.signal = torch.zeros(len(self.layers), steps, dtype=torch.float64, device=dev)
        self.noise = torch.zeros_like(self.signal)
        self.steps = steps
        self.handles = [m.register_forward_hook(self._hook(i, *fp_weights[n]))
                        for i, (n, m) in enumerate(self.layers)]

    def _hook(self, i: int, w: torch.Tensor, b):
        def hook(mod, args, out):
            x = args[0]
            step = mod.state.step_index if mod.state is not None and mod.state.step_index is not None else 0
            if step >= self.steps:
                return
            ref = F.linear(x.float(), w.float(), None if b is None else b.float())   # (..., N)
            self.signal[i, step] += ref.pow(2).sum(dtype=torch.float64)
            self.noise[i, step] += (out.float() - ref).pow(2).sum(dtype=torch.float64)
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def result(self) -> dict:
        """{"layers": names, "sqnr_db": [[per step] per layer], "mean_db": mean over layers·steps,
        "per_layer_db": SQNR of each layer over all steps, "per_step_db": over all layers}."""
        sig, noi = self.signal.cpu(), self.noise.cpu()

        def db(s, n):
            if n <= 0:
                return None if s <= 0 else math.inf
            return 10 * math.log10(s / n) if s > 0 else -math.inf

        seen = sig > 0
        table = [[db(float(sig[i, t]), float(noi[i, t])) if seen[i, t] else None for t in range(self.steps)]
                 for i in range(len(self.names))]
        per_layer = [db(float(sig[i].sum()), float(noi[i].sum())) for i in range(len(self.names))]
        per_step = [db(float(sig[:, t].sum()), float(noi[:, t].sum())) if seen[:, t].any() else None
                    for t in range(self.steps)]
        finite = [v for row in table for v in row if v is not None and math.isfinite(v)]
        return {"layers": self.names, "sqnr_db": table, "per_layer_db": per_layer, "per_step_db": per_step,
                "mean_db": sum(finite) / len(finite) if finite else None}
