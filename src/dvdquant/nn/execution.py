"""QuantLinear on the kernels: the plan for one call and the kernel calls, with tensors and numbers.

``QuantLinear.forward`` comes here for every backend but "simulated". The model's
:class:`~dvdquant.kernels.ExecutionConfig` (on its ``RuntimeState``) and the layer's
:class:`~dvdquant.kernels.LinearLayout` go to :func:`dvdquant.kernels.plan_forward`; the chosen
kernel gets the layer's tensors, the transformed tokens and the step's numbers as arguments
(the kernels never read a layer). One log line per layer and fallback reason. A plan with path
"simulated" (dynamic smoothing in a configuration no kernel runs: per-channel Λ, a Paley rotation, a
float master, …; :func:`dvdquant.kernels.dynamic_smoothing_blocker`) runs the layer's own reference forward.

Dynamic smoothing on the kernels: the layer's per-sample Λ (its tokens' channel absmax, reduced over
every rank's tokens under context parallelism) goes to the kernel as an argument, which derives s_g,
re-quantizes each sample's weight from the int8 master and runs one GEMM per sample
(:mod:`dvdquant.kernels.fp8_dynamic`); the emulated backend runs the same pipeline in torch
(:func:`dvdquant.kernels.emulated.emulated_dynamic_linear`). Weight-only (A16) calls of such a layer use
its cached s = 1 weight, as the simulated path does.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..kernels import Plan, plan_forward
from ..kernels.emulated import QuantizedActivations, QuantWeight, emulated_dynamic_linear, emulated_linear
from ..kernels.emulated import quantize_activations as quantize_codes
from ..kernels.env import log_once
from ..kernels.execution import LinearLayout, dynamic_smoothing_blocker
from ..kernels.finite import layer_key
from ..numerics import grids
from ..numerics.samples import per_sample_absmax, sample_count, scale_per_sample

log = logging.getLogger(__name__)


def layout(layer) -> LinearLayout:
    """The static configuration of ``layer`` that the planner reads."""
    return LinearLayout(layer.in_features, layer.out_features, layer.w_bits, layer.packed, layer.group_size,
                        layer.a_bits, layer.a8_format == "fp8_e4m3", int(layer.rotation_block or 0),
                        layer.auto_scale, layer.scale_block, layer.smooth is not None,
                        layer.act_balance is not None, layer.w_block_sum is not None, layer.dyn_alpha is not None,
                        16 if layer.dyn_alpha is not None and layer.w_master_scale is None else 8)


def plan(layer, device, bits: Optional[int], capability=None) -> Plan:
    """:func:`~dvdquant.kernels.plan_forward` for ``layer`` under its model's execution config."""
    return plan_forward(layout(layer), layer.execution, device, bits, capability)


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    """Run ``layer`` on ``x`` along the plan of this call.

    Under ``torch.compile`` the plan is the bit-independent one and the step's bits are read inside
    the FP8 custom op (no guard on the Python-side bit-width, so δ-GBS never recompiles); logging is
    skipped while tracing (the op logs the A6/A8 format note itself).
    """
    compiling = torch.compiler.is_compiling()
    p = plan(layer, x.device, None if compiling else layer.current_a_bits())
    if p.reason and not compiling:
        name, why = layer.layer_name or id(layer), f"falling back to {p.path}: {p.reason}"
        log_once(log, ("layer", name, why), "layer %s: %s", name, why)
    if p.path == "simulated":
        return layer.forward_simulated(x)
    if p.path == "emulated":
        return emulated_forward(layer, x)
    if p.path == "int4_gemv":
        from ..kernels.weight_only import weight_only_linear  # imports triton: only on CUDA
        return weight_only_linear(x, layer.qweight, layer.w_zero, layer.w_scale, layer.bias)
    if layer.dyn_alpha is not None:
        return fp8_dynamic_forward(layer, x)
    return fp8_forward(layer, x, per_block=p.per_block)


# ------------------------------------------------------------------------------ emulated
def quant_weight(layer) -> QuantWeight:
    return QuantWeight(layer.qweight, layer.w_scale, layer.w_zero, layer.w_bits, layer.packed)


def _step(layer) -> int:
    state = layer.state
    return 0 if state is None or state.step_index is None else state.step_index


def channel_balance(layer, x2: torch.Tensor, samples: int = 1) -> Optional[torch.Tensor]:
    """λ (G, K) for ``per_channel`` auto-scaling (one row per sample, maxima over every rank's tokens under
    context parallelism), (1, K) for a calibrated ``act_balance``; else None."""
    if layer.act_balance is not None:
        return layer.act_balance[min(_step(layer), layer.act_balance.shape[0] - 1)].unsqueeze(0)
    if layer.auto_scale == "per_channel":
        lam = per_sample_absmax(x2, samples)
        lam = lam if layer.state is None else layer.state.all_tokens_max(lam)
        return torch.where(lam > 0, lam, torch.ones_like(lam))
    return None


def act_format(layer, bits: int) -> str:
    """``"fp8"`` when the layer uses FP8 e4m3 activations at ``bits``, else ``"int"``."""
    return "fp8" if bits == 8 and layer.a8_format == "fp8_e4m3" else "int"


def _scale_block(layer, k: int) -> int:
    """Channels per activation scale without a balance λ: ``scale_block`` for ARQ ``per_block`` where it divides K."""
    if layer.auto_scale == "per_block" and layer.act_balance is None and k % layer.scale_block == 0:
        return layer.scale_block
    return k


def quantize_activations(layer, x2: torch.Tensor, bits: int, fmt: Optional[str] = None,
                         samples: int = 1) -> QuantizedActivations:
    """``layer``'s activation codes of transformed fp32 tokens ``x2`` (M, K) of ``samples`` batch elements."""
    return quantize_codes(x2, bits, fmt or act_format(layer, bits), channel_balance(layer, x2, samples),
                          _scale_block(layer, x2.shape[1]))


def emulated_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The integer pipeline in fp32 torch (:mod:`dvdquant.kernels.emulated`); bit-identical to
    ``forward_simulated`` (an exact block-mean term: the pipeline on the block-centred tokens plus the
    fp32 mean term, ``layer.with_exact_mean``, as the simulated path)."""
    if layer.w_block_sum is not None:
        return layer.with_exact_mean(x, lambda xc: _integer_pipeline(layer, xc))
    if layer.dyn_alpha is not None and not grids.is_weight_only(layer.current_a_bits()):
        return _dynamic_pipeline(layer, x)
    return _integer_pipeline(layer, x)


def _dynamic_pipeline(layer, x: torch.Tensor) -> torch.Tensor:
    """Dynamic smoothing's integer pipeline (:func:`~dvdquant.kernels.emulated.emulated_dynamic_linear`);
    a configuration no kernel runs takes the simulated forward (plans do not send one here)."""
    if dynamic_smoothing_blocker(layout(layer)):
        return layer.forward_simulated(x)
    shape = x.shape
    x2 = x.reshape(-1, layer.in_features).float()
    bits = layer.current_a_bits()
    s = layer.dynamic_smoothing(x2, sample_count(shape))                        # (G, K)
    xt = layer.transform_input(scale_per_sample(x2, s, True))
    layer._require_finite(xt)
    y = emulated_dynamic_linear(xt, s, bits, act_format(layer, bits), layer.w_master, layer.w_master_scale,
                                layer.w_colmax, layer.w_bits, layer.w_symmetric, layer.rotation_block, layer.bias)
    return y.to(x.dtype).reshape(*shape[:-1], layer.out_features)


def _integer_pipeline(layer, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    xt = layer.transform_input(x.reshape(-1, layer.in_features).float())       # (M, K)
    samples = sample_count(shape)                                               # statistics per batch element
    bits = layer.current_a_bits()
    fmt, lam, block = "int", None, None
    if not grids.is_weight_only(bits):
        layer._require_finite(xt)
        fmt, block = act_format(layer, bits), _scale_block(layer, xt.shape[1])
        lam = channel_balance(layer, xt, samples)
    y = emulated_linear(xt, samples, bits, quant_weight(layer), layer.bias, fmt, lam, block)
    return y.to(x.dtype).reshape(*shape[:-1], layer.out_features)


def dequantized_weight(layer) -> torch.Tensor:
    """Ŵ (N, K) fp32 as the emulated path builds it."""
    return quant_weight(layer).dequantized()


# ------------------------------------------------------------------------------ fp8
def _bits_tensor(layer, bits: Optional[int]) -> torch.Tensor:
    if bits is not None:
        return torch.full((1,), int(bits), dtype=torch.int32)
    if layer.state is not None:
        return layer.state.bits_tensor
    return torch.full((1,), -1, dtype=torch.int32)


def selected_smooth(layer) -> Optional[torch.Tensor]:
    """This step's row of the layer's static smoothing divisor (None without one)."""
    if layer.smooth is None:
        return None
    return layer.smooth[min(_step(layer), layer.smooth.shape[0] - 1)]


def fp8_options(layer, per_block: bool = False):
    from ..kernels.fp8 import FP8Options    # imports triton: only on the FP8 path
    ex = layer.execution
    return FP8Options(int(layer.a_bits), int(layer.rotation_block or 0), int(layer.scale_block), bool(per_block),
                      layer.a8_format == "fp8_e4m3", ex.fast_accum, ex.exact_rotation, ex.int8_gemm)


def fp8_forward(layer, x: torch.Tensor, bits: Optional[int] = None, per_block: bool = False) -> torch.Tensor:
    """y = x̂ Ŵᵀ + b through the FP8 op; output in x's dtype. ``bits`` None: the op reads the step's bits
    from the model's RuntimeState (the compiled path); an int forces them."""
    from ..kernels.fp8 import w4_linear
    return w4_linear(x, [layer.qweight], [layer.w_zero], layer.w_scale, layer.bias, selected_smooth(layer),
                     _bits_tensor(layer, bits), fp8_options(layer, per_block), name_key(layer))


def fp8_dynamic_forward(layer, x: torch.Tensor, bits: Optional[int] = None) -> torch.Tensor:
    """A dynamic-smoothing layer through :func:`~dvdquant.kernels.fp8_dynamic.dynamic_linear`: Λ per sample
    (over every rank's tokens) here, the rest in the op; output in x's dtype. ``bits`` as :func:`fp8_forward`."""
    from ..kernels.fp8_dynamic import dynamic_linear
    lam = layer._all_tokens(per_sample_absmax(x.reshape(-1, layer.in_features), sample_count(x.shape)).float())
    return dynamic_linear(x, lam, layer.w_master, layer.w_master_scale, layer.w_colmax, layer.qweight, layer.w_zero,
                          layer.w_scale, layer.bias, _bits_tensor(layer, bits), layer.dyn_alpha, fp8_options(layer),
                          layer.w_bits, layer.w_symmetric, name_key(layer))


def name_key(layer) -> torch.Tensor:
    """The layer's name as the FP8 ops take it (:func:`dvdquant.kernels.finite.layer_key`): a tensor, so
    ``torch.compile`` shares one frame between layers of the same form instead of guarding on each name."""
    key = getattr(layer, "name_key", None)
    return layer_key(str(layer.layer_name or "")) if key is None else key


def fp8_forward_fused(members: list, x: torch.Tensor, key: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sibling layers (same input, same activation configuration, per-token scales, no smoothing; checked by
    :mod:`dvdquant.nn.fused`) on ``x`` (..., K) → (..., ΣN), one FP8 op call."""
    from ..kernels.fp8 import w4_linear
    lead = members[0]
    w_scale = torch.cat([m.w_scale.reshape(-1, 1) for m in members])         # (ΣN, 1)
    bias = None if lead.bias is None else torch.cat([m.bias.reshape(-1) for m in members])
    return w4_linear(x, [m.qweight for m in members], [m.w_zero for m in members], w_scale, bias, None,
                     _bits_tensor(lead, None), fp8_options(lead),
                     layer_key("+".join(str(m.layer_name or "") for m in members)) if key is None else key)


__all__ = ["layout", "plan", "forward", "emulated_forward", "quantize_activations", "channel_balance",
           "dequantized_weight", "fp8_forward", "fp8_dynamic_forward", "fp8_forward_fused", "selected_smooth"]
