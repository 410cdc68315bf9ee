"""Execution backends for quantized linears: emulated (any device) and FP8 (Hopper/Ada).

``QuantLinear.forward`` calls :func:`quant_linear_forward` whenever ``module.backend`` is not
``"simulated"``. Backends:

* ``"emulated"`` — the integer pipeline in plain torch (:mod:`.emulated`); bit-identical to
  ``forward_simulated``; runs everywhere (CI).
* ``"fp8"`` — fused Triton activation quantization (:mod:`.triton_act_quant`), int4 → FP8
  weight expansion (:mod:`.expand`) and an exact integer GEMM. Int-grid steps with per-token
  scales use int8 codes and an INT8 tensor-core GEMM (:mod:`.int8_gemm`) — A6/A8 everywhere, A4 on
  sm90, where it beats cuBLAS' exact FP8 GEMM; A4 elsewhere, per-block scales and the opt-ins
  (``set_backend(..., int8_gemm=False)``: A6/A8 as FP8 e4m3 values; ``fast_accum``) run
  ``torch._scaled_mm`` (:mod:`.fp8`).
  Layers or steps it cannot run exactly fall back to emulated, with one log line per layer and
  reason.
* ``"auto"`` — ``"fp8"`` on an FP8-capable CUDA device (sm89+) with Triton, else emulated.

The decision is :func:`plan_forward`, a pure function of the module's configuration, the
device and the current activation bit-width, so it can be tested on a CPU. It is re-evaluated
at every call: δ-GBS changes ``module.current_a_bits()`` between steps and the plan follows
(A4 → int-grid codes, A8 → FP8 codes) with no recompilation (both kernel variants are
compiled once) and no extra weight copy.

Weight-only layers (``module.a_bits == 16``, e.g. AdaLN modulation: one token per sample) run the
int4 GEMV (:mod:`.weight_only`, path ``"int4_gemv"``) on CUDA with Triton when their weights are
packed per-channel int4 and no input transform is configured, else the emulated path (the
dequantized weight rebuilt per call); no weight copy is kept either way, in eager and compiled
models alike, and their plan does not depend on the step's bits.

This package duck-types the module (never imports ``dvdquant.nn`` or diffusers).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..errors import ConfigError
from ..numerics.grids import is_weight_only
from .emulated import emulated_forward
from .env import log_once, triton_available
from .finite import finite_check_mode, first_nonfinite_layer, raise_if_nonfinite

log = logging.getLogger(__name__)

BACKENDS = ("emulated", "fp8", "auto")


@dataclass(frozen=True)
class Plan:
    """How one forward call runs: ``path`` is "emulated", "fp8" or "int4_gemv"; ``reason`` explains a fallback."""

    path: str
    reason: str = ""
    fmt: str = "int"          # fp8 path: "int" (int-grid codes: e4m3 ≤ 5 bits, int8 + INT8 GEMM 6–8) or "fp8"
    per_block: bool = False   # fp8 path: per-(token, 128-channel) activation scales
    note: str = ""            # fp8 path: a numerics difference worth one log line


def device_capability(device) -> Optional[Tuple[int, int]]:
    """CUDA compute capability of ``device``, or None for non-CUDA devices."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def plan_forward(module, device, bits: Optional[int], capability: Optional[Tuple[int, int]] = None) -> Plan:
    """Decide the execution path of one call. ``capability`` overrides the device's (for tests).

    Paths: ``"emulated"``, ``"fp8"`` (W4A4/A8 on FP8 tensor cores), ``"int4_gemv"`` (weight-only
    layers on CUDA: :mod:`.weight_only`).

    ``bits=None`` gives the bit-independent plan a compiled model uses: the FP8 op then picks
    the activation format from the step's bits at run time (A ≥ 16 runs a bf16 GEMM on the
    dequantized weight inside the op instead of the emulated fallback).
    """
    backend = module.backend
    if backend not in BACKENDS:
        raise ConfigError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "emulated":
        return Plan("emulated")
    if getattr(module, "w_block_sum", None) is not None:
        return Plan("emulated", "the exact block-mean term (mean_channel='exact') has no fp8 kernel yet")
    cap = capability if capability is not None else device_capability(device)
    if is_weight_only(module.a_bits):
        return _weight_only_plan(module, cap)      # weight-only layers: their own path, not a fallback
    if cap is None or cap < (8, 9):
        why = "" if backend == "auto" else "fp8 backend needs an FP8-capable CUDA device (sm89+)"
        return Plan("emulated", why)
    k, n = module.in_features, module.out_features
    if bits is not None and bits >= 16:
        return Plan("emulated", "16-bit activations: no quantization, fp32 emulated matmul")
    if module.w_bits != 4 or not module.packed:
        return Plan("emulated", f"fp8 path needs packed 4-bit weights (w_bits={module.w_bits})")
    if module.group_size is not None and module.group_size != k:
        return Plan("emulated", f"group-wise weights (group_size={module.group_size}) need per-group "
                                "rescaling inside the GEMM")
    if k % 16 or n % 16:
        return Plan("emulated", f"dims {k}->{n} are not multiples of 16 (_scaled_mm)")
    if getattr(module, "act_balance", None) is not None:
        return Plan("emulated", "calibrated per-channel act_balance varies along K inside the dot product")
    if module.auto_scale == "per_channel":
        return Plan("emulated", "per_channel auto-scaling varies along K inside the dot product")
    # a scale block that does not divide K, or spans all of it, is one scale per token
    per_block = module.auto_scale == "per_block" and k % module.scale_block == 0 and module.scale_block != k
    if per_block and (module.scale_block != 128 or cap < (9, 0)):
        return Plan("emulated", f"per_block scaling needs scale_block=128 on sm90 "
                                f"(got {module.scale_block}, sm{cap[0]}{cap[1]})")
    if not triton_available():
        return Plan("emulated", "triton is not installed")
    if bits is None or bits <= 5:
        return Plan("fp8", fmt="int", per_block=per_block)
    if getattr(module, "a8_format", "int") == "fp8_e4m3" and bits == 8:
        return Plan("fp8", fmt="fp8", per_block=per_block)
    if getattr(module, "fp8_int8_gemm", True) and not per_block:    # default: int8 codes, exact INT8 GEMM
        return Plan("fp8", fmt="int", per_block=False)
    return Plan("fp8", fmt="fp8", per_block=per_block,
                note=f"A{bits} int-grid codes are not exact in e4m3: using FP8 e4m3 activations (s = amax/448)")


def _weight_only_plan(module, cap: Optional[Tuple[int, int]]) -> Plan:
    """A16 layers: the int4 GEMV where it computes the emulated function, else emulated (silently)."""
    k = module.in_features
    gemv_ok = (cap is not None and module.w_bits == 4 and module.packed
               and module.group_size in (None, k) and not module.rotation_block
               and getattr(module, "smooth", None) is None and getattr(module, "act_balance", None) is None
               and module.auto_scale != "per_channel" and k % 2 == 0 and triton_available())
    return Plan("int4_gemv" if gemv_ok else "emulated")


def _log_once(module, msg: str) -> None:
    name = getattr(module, "layer_name", "") or id(module)
    log_once(log, ("layer", name, msg), "layer %s: %s", name, msg)


def quant_linear_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Run a QuantLinear-like ``module`` on ``x`` (..., K) with its ``backend``.

    Under ``torch.compile`` the plan is the bit-independent one and the step's bits are read
    inside the FP8 custom op (no guard on the Python-side bit-width, so δ-GBS never recompiles);
    logging is skipped while tracing (the op logs the A6/A8 format note itself).
    """
    compiling = torch.compiler.is_compiling()
    bits = None if compiling else module.current_a_bits()
    plan = plan_forward(module, x.device, bits)
    if plan.reason and not compiling:
        _log_once(module, f"falling back to emulated: {plan.reason}")
    if plan.path == "emulated":
        return emulated_forward(module, x)
    if plan.path == "int4_gemv":
        from .weight_only import weight_only_forward  # imports triton: only on CUDA
        return weight_only_forward(module, x)
    from .fp8 import fp8_forward  # imports triton: only on the FP8 path

    return fp8_forward(module, x, None, None, plan.per_block)


__all__ = ["BACKENDS", "Plan", "plan_forward", "quant_linear_forward", "emulated_forward",
           "device_capability", "finite_check_mode", "first_nonfinite_layer", "raise_if_nonfinite"]
