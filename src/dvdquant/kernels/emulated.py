"""EMULATED execution: the integer pipeline of a quantized linear, spelled out in plain torch.

Why this exists: it is the path every machine can run (CPU in CI, any GPU), and it states in
code exactly what the fast paths compute, as *integers plus scales*, not as fake-quantized
floats. It is bit-identical to ``QuantLinear.forward_simulated`` (the tests assert
``torch.equal``), because it performs the same fp32 operations in the same order; only the
intermediate representation differs (codes and scales are materialised).

The pipeline, for flattened tokens ``x`` (M, K) and a layer with N outputs:

1. transform: ``x ← (x / smooth_t) · H`` (static smoothing row for step t, block-diagonal
   Hadamard rotation), fp32 — ``module.transform_input``.
2. channel balance (optional): ``x ← x / λ`` with λ (G, K) from ARQ ``per_channel`` auto-scaling
   (absmax per channel of each sample's tokens: G samples, :mod:`dvdquant.numerics.samples`) or
   λ (1, K), a calibrated ``act_balance`` row.
3. quantize per token, or per (token, ``scale_block`` channels) for ARQ ``per_block``::

       int grid, b bits:  s = amax/qmax, c = clamp(round_half_even(x/s), −qmax, qmax)  (int8)
       FP8 e4m3:          s = amax/448,  c = fp8_e4m3(x/s)                            (float8)

4. weights: ``W_int = q − z`` (integers, [−15, 15] for 4 bits), ``Ŵ = Δ ⊙ W_int``.
5. per-token scales, per-channel Δ, no λ: ``y = ((Σ_k c·W_int) · Δ) · s + b`` with the code sum
   exact (:func:`dvdquant.numerics.linear.linear_per_token_per_channel`, the FP8 GEMM's
   epilogue order); otherwise ``y = ((c · s) · λ) @ Ŵᵀ + b`` in fp32, one GEMM per sample (a float
   GEMM's rounding may depend on its row count). Cast to the input dtype.

The Hopper path (:mod:`dvdquant.kernels.fp8`) runs steps 1–3 in one Triton kernel and step 5
as an FP8 GEMM with the scales in its epilogue; for A4 (≤ 5-bit int codes) with per-token
scales it computes the same bits as this path (exact rotation, exact integer GEMM, same
epilogue order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import NonFiniteError
from ..numerics import grids
from ..numerics.linear import linear_per_token_per_channel
from ..numerics.packing import unpack_int4
from ..numerics.samples import matmul_per_sample, per_sample_absmax, sample_count, scale_per_sample


@dataclass
class QuantizedActivations:
    """Activation codes and their scales.

    ``codes`` (M, K): int8 integer codes (``fmt == "int"``) or float8_e4m3fn values (``"fp8"``).
    ``scale`` (M, G) fp32, one per token and ``block`` channels (G = K // block).
    ``lam`` (G, K) fp32 or None: per-channel balance of each of the G samples (a (1, K) row serves
    them all), multiplied back after dequantization.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    block: int
    fmt: str
    lam: Optional[torch.Tensor] = None

    def dequantize(self) -> torch.Tensor:
        """x̂ (M, K) fp32, with the same operation order as the simulated path."""
        m, k = self.codes.shape
        g = k // self.block
        xq = (self.codes.float().reshape(m, g, self.block) * self.scale.reshape(m, g, 1)).reshape(m, k)
        return xq if self.lam is None else scale_per_sample(xq, self.lam, False)


def quantize_rows(x: torch.Tensor, bits: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of fp32 ``x`` (R, C): codes (R, C) and scale (R, 1) (grids contract)."""
    if fmt == "fp8":
        return grids.quantize_act_per_token_fp8_e4m3(x)
    return grids.quantize_act_per_token_int(x, bits)


def act_format(module, bits: int) -> str:
    """``"fp8"`` when the simulated path uses FP8 e4m3 activations at ``bits``, else ``"int"``."""
    return "fp8" if bits == 8 and getattr(module, "a8_format", "int") == "fp8_e4m3" else "int"


def _step(module) -> int:
    state = getattr(module, "state", None)
    return 0 if state is None or state.step_index is None else state.step_index


def channel_balance(module, x2: torch.Tensor, samples: int = 1) -> Optional[torch.Tensor]:
    """λ (G, K) for ``per_channel`` auto-scaling (one row per sample), (1, K) for a calibrated
    ``act_balance``; else None."""
    balance = getattr(module, "act_balance", None)
    if balance is not None:
        return balance[min(_step(module), balance.shape[0] - 1)].unsqueeze(0)
    if module.auto_scale == "per_channel":
        lam = per_sample_absmax(x2, samples)
        state = getattr(module, "state", None)              # context parallelism: max over all ranks' tokens
        lam = lam if state is None else state.all_tokens_max(lam)
        return torch.where(lam > 0, lam, torch.ones_like(lam))
    return None


def quantize_activations(module, x2: torch.Tensor, bits: int, fmt: Optional[str] = None, samples: int = 1
                         ) -> QuantizedActivations:
    """Steps 2–3 on transformed fp32 tokens (M, K) of ``samples`` batch elements."""
    fmt = fmt or act_format(module, bits)
    m, k = x2.shape
    lam = channel_balance(module, x2, samples)
    if lam is not None:
        codes, scale = quantize_rows(scale_per_sample(x2, lam, True), bits, fmt)
        return QuantizedActivations(codes, scale, k, fmt, lam)
    block = k
    if module.auto_scale == "per_block" and getattr(module, "act_balance", None) is None:
        block = module.scale_block if k % module.scale_block == 0 else k
    codes, scale = quantize_rows(x2.reshape(m * (k // block), block), bits, fmt)
    return QuantizedActivations(codes.reshape(m, k), scale.reshape(m, k // block), block, fmt)


def integer_weight(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(q − z) as fp32 integers (N, K) and Δ (N, G) fp32."""
    codes = unpack_int4(module.qweight) if module.packed else module.qweight
    n, k = codes.shape
    g = module.w_scale.shape[1]
    w_int = codes.float().reshape(n, g, k // g) - module.w_zero.unsqueeze(-1)
    return w_int.reshape(n, k), module.w_scale


def dequantized_weight(module) -> torch.Tensor:
    """Ŵ = Δ ⊙ (q − z), (N, K) fp32 (same products as ``grids.dequantize_weight``)."""
    w_int, scale = integer_weight(module)
    n, k = w_int.shape
    g = scale.shape[1]
    return (scale.unsqueeze(-1) * w_int.reshape(n, g, k // g)).reshape(n, k)


def emulated_forward(module, x: torch.Tensor) -> torch.Tensor:
    """The integer pipeline in fp32 torch; bit-identical to ``forward_simulated``.

    A layer with an exact block-mean term (``w_block_sum``, DVD-Quant ``mean_channel="exact"``) runs
    the pipeline on the block-centred tokens and adds the fp32 mean term, as the simulated path does
    (``module.with_exact_mean``).
    """
    if getattr(module, "w_block_sum", None) is not None:
        return module.with_exact_mean(x, lambda xc: _integer_pipeline(module, xc))
    return _integer_pipeline(module, x)


def _integer_pipeline(module, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x2 = module.transform_input(x.reshape(-1, module.in_features).float())     # (M, K)
    samples = sample_count(shape)                                               # statistics per batch element
    bits = module.current_a_bits()
    if bits < 16:
        amax = x2.abs().amax()
        if not torch.isfinite(amax):
            raise NonFiniteError(f"layer {module.layer_name or '?'}: input activations hold NaN/Inf")
        qa = quantize_activations(module, x2, bits, samples=samples)
        if qa.lam is None and qa.block == module.in_features and module.w_scale.shape[1] == 1:
            w_int, delta = integer_weight(module)
            pmax = None if qa.fmt == "fp8" else grids.act_qmax(bits) * grids.weight_int_max(module.w_bits)
            y = linear_per_token_per_channel(qa.codes, qa.scale, w_int, delta, module.bias, pmax)
            return y.to(x.dtype).reshape(*shape[:-1], module.out_features)
        x2 = qa.dequantize()
    y = matmul_per_sample(x2, dequantized_weight(module), samples)              # (M, N), one GEMM per sample
    if module.bias is not None:
        y = y + module.bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], module.out_features)
