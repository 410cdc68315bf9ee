"""Weight-only (W4A16) layers on CUDA: the int4 GEMV for a few tokens, the emulated matmul otherwise.

Why: AdaLN modulation layers (``quantize_modulation=True``) keep bf16 activations and see one
token per sample. On the emulated path each call dequantizes the whole int4 weight to fp32; the
GEMV of :mod:`.int4_gemv` reads the packed bytes once instead.

``dvdquant::w4a16_linear`` is a custom op so that ``torch.compile`` treats the layer as one opaque
call (a Triton launch with Python-side validation cannot be traced), exactly like the FP8 op.
Numerics: y = x·((q − z)·Δ)ᵀ + b with fp32 products and accumulation, as the emulated path, but
in another summation order (agreement to fp32 rounding, then the cast to x's dtype). M > MAX_M
(a weight-only layer fed many tokens) runs :func:`.int4_gemv.int4_linear_reference`, which is the
emulated computation itself.
"""
from __future__ import annotations

from typing import Optional

import torch

from .int4_gemv import MAX_M, int4_linear_reference, int4_linear_small_m


@torch.library.custom_op("dvdquant::w4a16_linear", mutates_args=())
def w4a16_linear(x2: torch.Tensor, qweight: torch.Tensor, w_zero: torch.Tensor, w_scale: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x2 (M, K) bf16/fp16/fp32, packed int4 ``qweight`` (N, K/2) → (M, N) in x2's dtype."""
    if x2.shape[0] <= MAX_M:
        return int4_linear_small_m(x2, qweight, w_zero, w_scale, bias, out_dtype=x2.dtype)
    return int4_linear_reference(x2, qweight, w_zero, w_scale, bias, out_dtype=x2.dtype)


@w4a16_linear.register_fake
def _w4a16_linear_fake(x2, qweight, w_zero, w_scale, bias):
    return x2.new_empty((x2.shape[0], qweight.shape[0]))


def weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, w_zero: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (..., K) through :func:`w4a16_linear` → (..., N) in x's dtype."""
    shape = x.shape
    y = w4a16_linear(x.reshape(-1, shape[-1]), qweight, w_zero, w_scale, bias)             # (M, N)
    return y.reshape(*shape[:-1], qweight.shape[0])
