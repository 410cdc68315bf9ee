"""How much of the transformer blocks really ran in a step: the signal that tells a cached step.

Step caches (diffusers' MagCache, FirstBlockCache, TaylorSeer, FasterCache, Pyramid Attention
Broadcast) serve a block, an attention module or a whole step from cached values instead of
running it; they decide inside their own hooks. Rather than reading each cache's private state,
the step runtime counts the work that ran: a forward pre-hook on every quantized layer inside the
transformer blocks (the ``ModuleList`` children named as in :data:`BLOCK_LISTS`; all quantized
layers if the model has none) adds the layer's multiply-accumulates (tokens × K × N) to a
:class:`WorkCounter`. A layer a cache skipped is never called, so it adds nothing. The
:class:`~dvdquant.nn.step_hooks.StepTracker` reads the counters once per step.

Eager calls add to a Python float. Under ``torch.compile`` the hook calls the custom op
``dvdquant::add_work``, which adds to a 1-element CPU float64 tensor at run time (an opaque op:
no graph break, no guard on the count, like the δ-GBS bits tensor of :mod:`dvdquant.nn.state`).
A fused projection (:mod:`dvdquant.nn.fused`) calls its members' probes itself.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

PROBE_ATTR = "_dvdquant_work_probe"          # on a probed QuantLinear: its WorkProbe
# the ModuleList children of a diffusers transformer that hold its blocks (as diffusers' caches find them)
BLOCK_LISTS = ("blocks", "transformer_blocks", "single_transformer_blocks", "temporal_transformer_blocks",
               "layers", "visual_transformer_blocks")


@torch.library.custom_op("dvdquant::add_work", mutates_args=("counter",))
def _add_work(counter: torch.Tensor, x: torch.Tensor, out_features: int) -> None:
    counter.add_(float(x.numel()) * out_features)


@_add_work.register_fake
def _(counter, x, out_features):
    return None


class WorkCounter:
    """Multiply-accumulates of the probed layers since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.eager = 0.0
        self.compiled = torch.zeros(1, dtype=torch.float64)

    def reset(self) -> None:
        self.eager = 0.0
        self.compiled.zero_()

    def read(self) -> float:
        return self.eager + float(self.compiled[0])


class WorkProbe:
    """Forward pre-hook of one quantized layer: adds its MACs of this call to ``counter``."""

    def __init__(self, counter: WorkCounter) -> None:
        self.counter = counter

    def __call__(self, module: nn.Module, args) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return
        if torch.compiler.is_compiling():
            torch.ops.dvdquant.add_work(self.counter.compiled, x, module.out_features)
        else:
            self.counter.eager += float(x.numel()) * module.out_features


def block_layers(model: nn.Module, layer_type: type) -> list:
    """The ``layer_type`` modules inside the model's transformer blocks (all of them if it has no block list)."""
    lists = [m for n, m in model.named_children() if n in BLOCK_LISTS and isinstance(m, nn.ModuleList)]
    roots = lists or [model]
    return [m for r in roots for m in r.modules() if isinstance(m, layer_type)]


def install_probes(model: nn.Module, layer_type: type, counter: WorkCounter) -> list:
    """Register a :class:`WorkProbe` on every block layer of ``model``; returns the hook handles."""
    handles = []
    for m in block_layers(model, layer_type):
        probe = WorkProbe(counter)
        setattr(m, PROBE_ATTR, probe)
        handles.append((m, m.register_forward_pre_hook(probe)))
    return handles


def remove_probes(handles: list) -> None:
    for m, h in handles:
        h.remove()
        if PROBE_ATTR in m.__dict__:
            delattr(m, PROBE_ATTR)


def run_probe(module: nn.Module, x: torch.Tensor) -> None:
    """Count a call of ``module`` that bypassed its forward (a fused projection's member)."""
    probe: Optional[WorkProbe] = getattr(module, PROBE_ATTR, None)
    if probe is not None:
        probe(module, (x,))
