"""Execution backends for quantized linears: emulated (any device) and FP8 (Hopper/Ada).

``QuantLinear.forward`` asks :func:`plan_forward` how to run whenever the model's
:class:`ExecutionConfig` (held on its ``RuntimeState``) names a backend other than ``"simulated"``,
then calls the chosen kernel with tensors and numbers (:mod:`dvdquant.nn.execution`). Backends:

* ``"emulated"`` — the integer pipeline in plain torch (:mod:`.emulated`); bit-identical to
  ``forward_simulated``; runs everywhere (CI).
* ``"fp8"`` — fused Triton activation quantization (:mod:`.triton_act_quant`), int4 → FP8
  weight expansion (:mod:`.expand`) and an exact integer GEMM. Int-grid steps with per-token
  scales use int8 codes and an INT8 tensor-core GEMM (:mod:`.int8_gemm`) — A6/A8 everywhere, A4 on
  sm90, where it beats cuBLAS' exact FP8 GEMM; A4 elsewhere, per-block scales and the opt-ins
  (``int8_gemm=False``: A6/A8 as FP8 e4m3 values; ``fast_accum``) run ``torch._scaled_mm`` (:mod:`.fp8`).
  Layers or steps it cannot run exactly fall back to emulated, with one log line per layer and
  reason.
* ``"auto"`` — ``"fp8"`` on an FP8-capable CUDA device (sm89+) with Triton, else emulated.

Layers with DVD-Quant's dynamic smoothing whose activations have per-token scales (and an in-kernel
rotation or none, one weight step per row, an int8 master: :func:`dynamic_smoothing_blocker`) take the
same plans: emulated, they run the dynamic pipeline in torch (:func:`.emulated.emulated_dynamic_linear`);
on "fp8", the per-sample weights are re-quantized by a Triton kernel (:mod:`.weight_requant`), each
sample's tokens go through the activation kernel with its s_g as the smoothing divisor, and one GEMM per
sample (:mod:`.fp8_dynamic`). Other dynamic-smoothing layers run their simulated forward on every backend
(path ``"simulated"``, one log line per layer and reason).

:func:`plan_forward` is a pure function of the layer's :class:`LinearLayout`, the execution config,
the device and the current activation bit-width, so it can be tested on a CPU. It is re-evaluated
at every call: δ-GBS changes the step's bits and the plan follows (A4 → int-grid codes, A8 → FP8
codes) with no recompilation (both kernel variants are compiled once) and no extra weight copy.

Weight-only layers (A16, :func:`dvdquant.numerics.grids.is_weight_only`; e.g. AdaLN modulation: one
token per sample) run the int4 GEMV (:mod:`.weight_only`, path ``"int4_gemv"``) on CUDA with Triton
when their weights are packed per-channel int4 and no input transform is configured, else the
emulated path; their plan does not depend on the step's bits.

This package never imports ``dvdquant.nn`` or diffusers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..errors import ConfigError
from ..numerics.grids import is_weight_only
from .emulated import emulated_linear
from .env import triton_available
from .execution import ATTENTION_PATHS, BACKENDS, ExecutionConfig, LinearLayout, dynamic_smoothing_blocker
from .finite import finite_check_mode, first_nonfinite_layer, raise_if_nonfinite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """How one forward call runs: ``path`` is "emulated", "fp8", "int4_gemv" or "simulated" (the layer's own
    fp32 reference forward, for layouts no kernel runs); ``reason`` explains a fallback."""

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


def plan_forward(layout: LinearLayout, execution: ExecutionConfig, device, bits: Optional[int],
                 capability: Optional[Tuple[int, int]] = None) -> Plan:
    """Decide the execution path of one call of a layer with ``layout`` under ``execution`` (its backend
    and GEMM route). ``capability`` overrides the device's (for tests).

    Paths: ``"emulated"``, ``"fp8"`` (W4A4/A8 on FP8 / INT8 tensor cores), ``"int4_gemv"`` (weight-only
    layers on CUDA: :mod:`.weight_only`), ``"simulated"`` (dynamic smoothing that
    :func:`dynamic_smoothing_blocker` rules out, on every backend). A dynamic-smoothing layer that runs
    on the kernels gets the same plan as any other layer (its "emulated" / "fp8" forwards re-quantize
    the weight per sample).

    ``bits=None`` gives the bit-independent plan a compiled model uses: the FP8 op then picks
    the activation format from the step's bits at run time (A ≥ 16 runs a bf16 GEMM on the
    dequantized weight inside the op instead of the emulated fallback).
    """
    backend = execution.backend
    if backend not in BACKENDS:
        raise ConfigError(f"plan_forward: backend {backend!r} runs no kernel")
    if layout.dynamic_smoothing and not is_weight_only(layout.a_bits):
        why = dynamic_smoothing_blocker(layout)
        if why:
            return Plan("simulated", why)
    if backend == "emulated":
        return Plan("emulated")
    if layout.exact_mean:
        return Plan("emulated", "the exact block-mean term (mean_channel='exact') has no fp8 kernel yet")
    cap = capability if capability is not None else device_capability(device)
    if is_weight_only(layout.a_bits):
        return _weight_only_plan(layout, cap)      # weight-only layers: their own path, not a fallback
    if cap is None or cap < (8, 9):
        why = "" if backend == "auto" else "fp8 backend needs an FP8-capable CUDA device (sm89+)"
        return Plan("emulated", why)
    k, n = layout.in_features, layout.out_features
    if bits is not None and is_weight_only(bits):
        return Plan("emulated", "16-bit activations: no quantization, fp32 emulated matmul")
    if layout.w_bits != 4 or not layout.packed:
        return Plan("emulated", f"fp8 path needs packed 4-bit weights (w_bits={layout.w_bits})")
    if layout.group_size is not None and layout.group_size != k:
        return Plan("emulated", f"group-wise weights (group_size={layout.group_size}) need per-group "
                                "rescaling inside the GEMM")
    if k % 16 or n % 16:
        return Plan("emulated", f"dims {k}->{n} are not multiples of 16 (_scaled_mm)")
    if layout.act_balance:
        return Plan("emulated", "calibrated per-channel act_balance varies along K inside the dot product")
    if layout.auto_scale == "per_channel":
        return Plan("emulated", "per_channel auto-scaling varies along K inside the dot product")
    per_block = layout.per_block
    if per_block and (layout.scale_block != 128 or cap < (9, 0)):
        return Plan("emulated", f"per_block scaling needs scale_block=128 on sm90 "
                                f"(got {layout.scale_block}, sm{cap[0]}{cap[1]})")
    if not triton_available():
        return Plan("emulated", "triton is not installed")
    if bits is None or bits <= 5:
        return Plan("fp8", fmt="int", per_block=per_block)
    if layout.a8_fp8 and bits == 8:
        return Plan("fp8", fmt="fp8", per_block=per_block)
    if execution.int8_gemm and not per_block:    # default: int8 codes, exact INT8 GEMM
        return Plan("fp8", fmt="int", per_block=False)
    return Plan("fp8", fmt="fp8", per_block=per_block,
                note=f"A{bits} int-grid codes are not exact in e4m3: using FP8 e4m3 activations (s = amax/448)")


def _weight_only_plan(layout: LinearLayout, cap: Optional[Tuple[int, int]]) -> Plan:
    """A16 layers: the int4 GEMV where it computes the emulated function, else emulated (silently)."""
    k = layout.in_features
    gemv_ok = (cap is not None and layout.w_bits == 4 and layout.packed
               and layout.group_size in (None, k) and not layout.rotation_block
               and not layout.smooth and not layout.act_balance
               and layout.auto_scale != "per_channel" and k % 2 == 0 and triton_available())
    return Plan("int4_gemv" if gemv_ok else "emulated")


__all__ = ["ATTENTION_PATHS", "BACKENDS", "ExecutionConfig", "LinearLayout", "Plan", "plan_forward",
           "dynamic_smoothing_blocker",
           "emulated_linear", "device_capability", "finite_check_mode", "first_nonfinite_layer",
           "raise_if_nonfinite"]
