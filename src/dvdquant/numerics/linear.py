"""The quantized linear with per-token activation scales and per-channel weight steps, in the
operation order of the FP8 tensor-core GEMM, so that every path computes the same bits.

With activation codes c (M, K), per-token scales s (M, 1), weight integers W_int = q − z (N, K)
and per-channel steps Δ (N, 1), the layer is ``y = s · Δ · (c @ W_intᵀ) + b``. Fake
quantization spells it ``(c·s) @ (Δ·W_int)ᵀ``: every product rounds in fp32 and the sum's
order depends on the device's GEMM, so the simulated path, the emulated path and the FP8 path
agree only to ~1e-7 relative. On a 4-bit diffusion trajectory such differences move
quantizer codes and grow into different clips. Here the sum is taken *exactly* and then
scaled in the order cuBLAS' row-wise scaled FP8 GEMM applies in its epilogue (checked on an
H100 against ``_scaled_mm``: every output equal)::

    acc = Σ_k c[m, k] · W_int[n, k]          exact (integers: fp32 within 2^24, else fp64)
    y   = ((acc · Δ[n]) · s[m]) + b[n]        fp32, one rounding per operation

For int-grid codes of ≤ 5 bits the FP8 path's ``_scaled_mm`` (exact accumulation) computes
exactly this; FP8 e4m3 codes (A8 steps) are summed exactly here and rounded once, which the
tensor cores do not promise, so there the paths agree to ~1e-7 but not bit for bit.
"""
from __future__ import annotations

from typing import Optional

import torch

from .hadamard import fp32_matmul_is_ieee

_FP32_EXACT_UNITS = 2 ** 24


def exact_code_matmul(codes: torch.Tensor, w_int: torch.Tensor, product_max: Optional[int]) -> torch.Tensor:
    """Σ_k codes[m, k] · w_int[n, k] (M, N), exact, rounded once to fp32.

    ``codes`` (M, K) int8 / float8 / float values, ``w_int`` (N, K) integer-valued floats.
    ``product_max``: max |code| · max |w_int| for integer codes (e.g. 7 · 15 for A4 × W4), None
    otherwise. Integer codes whose worst-case sum K · product_max fits 2^24 go through an IEEE
    fp32 matmul (exact: every partial sum is an integer below 2^24); everything else through
    fp64 (exact for these operands: short significands, |sum| far below 2^53), rounded once.
    """
    k = codes.shape[-1]
    if product_max is not None and k * product_max <= _FP32_EXACT_UNITS and fp32_matmul_is_ieee(codes.device):
        return codes.float() @ w_int.float().t()
    return (codes.double() @ w_int.double().t()).float()


def linear_per_token_per_channel(codes: torch.Tensor, s: torch.Tensor, w_int: torch.Tensor,
                                 delta: torch.Tensor, bias: Optional[torch.Tensor],
                                 product_max: Optional[int]) -> torch.Tensor:
    """y (M, N) fp32 = ((acc · Δ) · s) + b with acc the exact code GEMM (module doc).

    ``s`` (M, 1) fp32 per-token scales, ``delta`` (N, 1) or (N,) fp32 steps, ``bias`` (N,) any
    float dtype (added in fp32) or None; ``product_max`` as in :func:`exact_code_matmul`.
    """
    acc = exact_code_matmul(codes, w_int, product_max)                   # (M, N)
    y = (acc * delta.reshape(1, -1).float()) * s.reshape(-1, 1).float()
    return y if bias is None else y + bias.float()
