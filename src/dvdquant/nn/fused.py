"""Sibling projections (Q/K/V) run as one on the fp8 path: one activation quantization, one GEMM.

Why this file exists: Q, K and V of an attention module read the same tokens. As three QuantLinears
they rotate and quantize those tokens three times and run three narrower GEMMs. Some
diffusers processors (Wan's) already know a fused form: with ``attn.fused_projections`` set they
call ``attn.to_qkv(x)`` once and split the output. :func:`install_fused_projections` gives them that
attribute as a :class:`FusedProjection`, which quantizes the tokens once and runs one GEMM over the
members' weights (:func:`dvdquant.nn.execution.fp8_forward_fused`).

Nothing is copied or re-quantized: the callable reads the members' packed weights at each call (so
``.to()``, loading and δ-GBS keep working), it is not a submodule (state dicts and checkpoints keep
the members), and every output column is computed as the member computes it, so the fused outputs
equal the members' side by side, bit for bit. Outside the fp8 path (simulated, emulated, per-block
scales) it simply calls the members. Which modules and attributes: the model adapter's
``fused_projections`` data (:class:`dvdquant.models.adapters.FusedProjection`), passed in. Processors
without a fused form (HunyuanVideo's) run as a fused-aware subclass while the fusion is installed
(:mod:`dvdquant.nn.processors`).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

from ..kernels.finite import layer_key
from .execution import fp8_forward_fused, plan
from .step_work import run_probe

log = logging.getLogger(__name__)

FUSED_ATTR = "_dvdquant_fused"       # on an attention module: the attribute names installed here
UNFUSED_CLASS_ATTR = "_dvdquant_unfused_class"   # on a processor switched to its fused-aware subclass
# Member attributes that must agree for one activation quantization to serve them all.
# (The execution config is the members' shared RuntimeState's: one for all of them.)
_SAME = ("in_features", "a_bits", "rotation_block", "auto_scale", "scale_block", "a8_format", "w_bits",
         "group_size")


class FusedProjection:
    """Callable ``x (..., K) → (..., ΣN)``: the member QuantLinears' outputs side by side."""

    def __init__(self, members: list, names: list) -> None:
        self.members = list(members)
        self.names = list(names)
        self.name_key = layer_key("+".join(str(m.layer_name or "") for m in self.members))   # see execution.name_key

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = self.members[0]
        shared = all(m.state is lead.state for m in self.members) and _first_difference(self.members) is None
        if shared and lead.execution.backend in ("fp8", "auto"):       # else: call each member
            bits = None if torch.compiler.is_compiling() else lead.current_a_bits()
            p = plan(lead, x.device, bits)
            if p.path == "fp8" and not p.per_block:
                for m in self.members:                   # the members' forwards are bypassed: count their work
                    run_probe(m, x)
                return fp8_forward_fused(self.members, x, self.name_key)
        return torch.cat([m(x) for m in self.members], dim=-1)

    def __repr__(self) -> str:
        return f"FusedProjection({', '.join(self.names)})"


def _first_difference(members: list) -> Optional[str]:
    """The first of :data:`_SAME` in which the members differ (they can change after installation)."""
    lead = members[0]
    return next((a for a in _SAME if any(getattr(m, a, None) != getattr(lead, a, None) for m in members[1:])), None)


def incompatibility(members: list) -> Optional[str]:
    """Why ``members`` cannot share one activation quantization and GEMM (None: they can)."""
    from .quant_linear import QuantLinear
    if len(members) < 2 or not all(isinstance(m, QuantLinear) for m in members):
        return "not all members are QuantLinear layers"
    lead = members[0]
    differ = _first_difference(members)
    if differ is not None:
        return f"members differ in {differ}"
    if any(m.state is not lead.state for m in members):
        return "members do not share one runtime state"
    if lead.w_bits != 4 or not all(m.packed for m in members):
        return "members need packed 4-bit weights"
    if any(getattr(m, a, None) is not None for m in members for a in ("smooth", "act_balance", "dyn_alpha")):
        return "per-layer input smoothing or balancing"
    if any(getattr(m, "w_block_sum", None) is not None for m in members):
        return "an exact block-mean term (mean_channel='exact')"
    if len({m.bias is None for m in members}) > 1:
        return "some members have a bias and some not"
    return None


def _when(module: nn.Module, spec) -> bool:
    if type(module).__name__ != spec.module_class:
        return False
    if spec.processor and type(getattr(module, "processor", None)).__name__ != spec.processor:
        return False
    for attr, value in spec.when:
        got = getattr(module, attr, None)
        if (got is None) if value == "present" else (got != value):
            return False
    return True


def install_fused_projections(model: nn.Module, specs) -> int:
    """Install the adapter's fused projections (``specs``: FusedProjection entries) on ``model``.

    A module gets them only if every entry that applies to it can be built (its processor then calls
    all of them); otherwise it stays unfused, with one log line. Modules the user fused natively
    (``fused_projections`` already set) are left alone. Returns the number of modules fused.
    """
    count = 0
    for name, mod in model.named_modules():
        groups = [sp for sp in specs if _when(mod, sp)]
        if not groups or getattr(mod, "fused_projections", False):
            continue
        built = {}
        for sp in groups:
            members = [getattr(mod, a, None) for a in sp.members]
            why = incompatibility(members)
            if why is not None:
                log.info("%s: not fusing %s (%s)", name, "/".join(sp.members), why)
                built = {}
                break
            built[sp.fused] = FusedProjection(members, [f"{name}.{a}" for a in sp.members])
        if not built:
            continue
        for attr, fused in built.items():
            setattr(mod, attr, fused)               # a plain attribute: not a submodule, not in the state dict
        if any(sp.processor for sp in groups):
            _switch_to_fused_aware(mod.processor)
        mod.fused_projections = True
        setattr(mod, FUSED_ATTR, tuple(built))
        count += 1
    return count


def _switch_to_fused_aware(proc) -> None:
    """Run ``proc`` as dvdquant's fused-aware subclass of its class; the instance and its state stay."""
    from .processors import FUSED_AWARE
    setattr(proc, UNFUSED_CLASS_ATTR, type(proc))
    proc.__class__ = FUSED_AWARE[type(proc).__name__]


def remove_fused_projections(model: nn.Module) -> int:
    """Undo :func:`install_fused_projections`; returns the number of modules restored."""
    count = 0
    for mod in model.modules():
        attrs = getattr(mod, FUSED_ATTR, None)
        if attrs is None:
            continue
        for attr in attrs:
            delattr(mod, attr)
        proc = getattr(mod, "processor", None)
        if hasattr(proc, UNFUSED_CLASS_ATTR):
            proc.__class__ = getattr(proc, UNFUSED_CLASS_ATTR)
            delattr(proc, UNFUSED_CLASS_ATTR)
        mod.fused_projections = False
        delattr(mod, FUSED_ATTR)
        count += 1
    return count


def fused_modules(model: nn.Module) -> list:
    """[(name, installed attribute names)] of the modules with fused projections installed."""
    return [(n, getattr(m, FUSED_ATTR)) for n, m in model.named_modules() if hasattr(m, FUSED_ATTR)]
