"""Dynamic smoothing on the FP8 / INT8 path: per-sample weights re-quantized on the GPU, one GEMM per sample.

For tokens x (M, K) of G samples (contiguous groups of L = M/G rows, :mod:`dvdquant.numerics.samples`)
and each sample's channel absmax Λ_g (reduced over every rank's tokens by the caller)::

    s_g   = smoothing_scales(Λ_g, colmax, α)                      torch, inside the op
    Ŵ_g   = (q − z, Δ) of Q(W·diag(s_g)·H)                        :mod:`.weight_requant` (int8 or e4m3)
    c, σ  = act_quant(x_g, smooth=s_g, rotation)                  :mod:`.triton_act_quant` (x_g / s_g: div_rn)
    y_g   = ((Σ c·W_int,g) · Δ_g) · σ + b                          the INT8 GEMM or ``_scaled_mm`` (:mod:`.fp8`)

— the same bits as :func:`dvdquant.kernels.emulated.emulated_dynamic_linear` on the same device for
int-grid codes (the exact integer GEMMs); FP8 e4m3 activations (A8 ``fp8_e4m3``) to the tensor cores'
accumulation, as for any layer. Weight-only steps (A16) use the layer's s = 1 weight (``qweight``), as
the simulated path does. Samples are re-quantized in chunks of ≤ :data:`CHUNK_ELEMENTS` weight entries
(one launch each). A custom op, like :func:`.fp8.w4_linear_fp8`: ``torch.compile`` traces around it and
the step's bits are read inside it.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import NonFiniteError
from ..numerics.grids import is_weight_only
from ..numerics.smoothing import smoothing_scales
from .finite import CLEAN, device_flag, finite_check_mode, layer_id, layer_key, layer_name_of
from .fp8 import (FP8Options, act_format_for, gemm_int8_rowwise, gemm_out_dtype, gemm_rowwise,
                  int8_tensor_cores_for_a4, quantize_tokens, resolve_bits, w4_linear_packed)
from .weight_requant import requant_weight

CHUNK_ELEMENTS = 1 << 26     # per-sample weights re-quantized per launch (G·N·K; 64 MB of int8 codes)


@torch.library.custom_op("dvdquant::dynamic_linear_fp8", mutates_args=())
def dynamic_linear_fp8(x2: torch.Tensor, lam: torch.Tensor, master: torch.Tensor, master_scale: torch.Tensor,
                       colmax: torch.Tensor, qweight: torch.Tensor, w_zero: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor], bits: torch.Tensor, alpha: float, options: list[int],
                       weight_options: list[int], layer: torch.Tensor) -> torch.Tensor:
    """x2 (M, K) of G = ``lam.shape[0]`` samples → (M, N) bf16/fp16 (module doc). ``options``:
    :meth:`.fp8.FP8Options.encode`; ``weight_options``: [w_bits, symmetric]; ``qweight`` / ``w_zero`` /
    ``w_scale``: the s = 1 weight, for weight-only steps; ``layer``: the layer's :func:`.finite.layer_key`."""
    layer_name = layer_name_of(layer)
    o = FP8Options.decode(options)
    b = resolve_bits(bits, o.a_bits)
    if is_weight_only(b):
        return w4_linear_packed(x2, qweight, w_zero, w_scale, bias, bits, o, layer_name)
    out_dtype = gemm_out_dtype(x2)
    bias_o = None if bias is None else bias.to(out_dtype)
    fmt = act_format_for(b, o.a8_fp8, layer_name, False, o.int8_gemm, o.fast_accum,
                         int8_tensor_cores_for_a4(x2.device))
    codes_dtype = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
    mode = finite_check_mode()
    flag = None
    if mode != "off":                 # "layer": a flag of this call's own, read once at the end
        flag = device_flag(x2.device) if mode == "step" else torch.full((1,), CLEAN, dtype=torch.int32,
                                                                          device=x2.device)
    fid = layer_id(layer_name) if flag is not None else 0
    s = smoothing_scales(lam, colmax, alpha)                                  # (G, K)
    n, k = master.shape
    rows = x2.shape[0] // s.shape[0]
    chunk = max(1, CHUNK_ELEMENTS // max(n * k, 1))
    y = torch.empty(x2.shape[0], n, dtype=out_dtype, device=x2.device)     # each sample's GEMM writes its rows
    for g0 in range(0, s.shape[0], chunk):
        w8, delta = requant_weight(master, master_scale, colmax, s[g0:g0 + chunk], bits=int(weight_options[0]),
                                   symmetric=bool(weight_options[1]), rotation_block=o.rotation_block or None,
                                   codes_dtype=codes_dtype, nonfinite_flag=flag, flag_id=fid)
        for j in range(w8.shape[0] // n):
            g = g0 + j
            q, sc = quantize_tokens(x2[g * rows:(g + 1) * rows], b, "int" if fmt == "int8" else fmt, s[g],
                                    o.rotation_block, None, flag, fid, o.exact_rotation, codes_dtype)
            wg, dg, yg = w8[j * n:(j + 1) * n], delta[j * n:(j + 1) * n], y[g * rows:(g + 1) * rows]
            if fmt == "int8":
                gemm_int8_rowwise(q, sc, wg, dg, bias_o, out_dtype, out=yg)
            else:
                yg.copy_(gemm_rowwise(q, sc, wg, dg, bias_o, out_dtype, o.fast_accum))
    if mode == "layer" and int(flag.item()) != CLEAN:                          # one sync per layer
        raise NonFiniteError(f"layer {layer_name or '?'}: input activations hold NaN/Inf")
    return y


@dynamic_linear_fp8.register_fake
def _dynamic_linear_fp8_fake(x2, lam, master, master_scale, colmax, qweight, w_zero, w_scale, bias, bits, alpha,
                             options, weight_options, layer):
    return x2.new_empty((x2.shape[0], master.shape[0]), dtype=gemm_out_dtype(x2))


def dynamic_linear(x: torch.Tensor, lam: torch.Tensor, master: torch.Tensor, master_scale: torch.Tensor,
                   colmax: torch.Tensor, qweight: torch.Tensor, w_zero: torch.Tensor, w_scale: torch.Tensor,
                   bias: Optional[torch.Tensor], bits: torch.Tensor, alpha: float, options: FP8Options,
                   w_bits: int, symmetric: bool, layer: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`dynamic_linear_fp8` of x (..., K) with Λ (G, K); output in x's dtype (bf16 GEMM output for fp32 x)."""
    shape = x.shape
    y = dynamic_linear_fp8(x.reshape(-1, shape[-1]), lam, master, master_scale, colmax, qweight, w_zero, w_scale,
                           bias, bits, float(alpha), options.encode(), [int(w_bits), int(symmetric)],
                           layer_key("") if layer is None else layer)
    return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])


__all__ = ["CHUNK_ELEMENTS", "dynamic_linear", "dynamic_linear_fp8"]
