"""Triton device functions shared by the activation-quantization kernels.

Why a module of its own: every kernel that quantizes activations — the two kernels of
:mod:`.triton_act_quant` and the measurement probes in ``benchmarks/`` — must quantize
identically (same scale, same round-half-even trick, same e4m3 rounding, same NaN handling), so
they share these functions instead of keeping copies. The exactness notes (why ``div_rn``, why
the magic-number rounding, why e4m3 rounding is done by hand) are in :mod:`.triton_act_quant`'s
docstring.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_e4m3(y):
    """Round fp32 ``y`` to the nearest e4m3 value (ties to even); exact fp32 arithmetic."""
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127                 # unbiased exponent of |y|
    e = tl.maximum(e, -6)                           # e4m3 subnormals share the ulp 2^-9
    magic = ((e + 20 + 127) << 23) | 0x400000       # 1.5 · 2^(e+20): its ulp is 2^(e−3)
    c = magic.to(tl.float32, bitcast=True)
    r = (y + c) - c
    return tl.where(r == 0.0, y * 0.0, r)          # keep the sign of zero, as torch's cast does


@triton.jit
def row_abs_max(x):
    """Row-wise max |x|, with NaN counted as +inf (so bad rows get an inf scale)."""
    ax = tl.where(x == x, tl.abs(x), float("inf"))
    return tl.max(ax, axis=1)


@triton.jit
def quantize_codes(x, s, qmax, FP8_FMT: tl.constexpr):
    """Codes of x / s (s broadcast per row), on the int grid or the e4m3 grid."""
    y = tl.math.div_rn(x, s[:, None])
    if FP8_FMT:
        return round_e4m3(y)
    r = (y + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(r, -qmax), qmax)


@triton.jit
def scale_of(amax, qmax, inv_qmax, SCALE_BY_RECIP: tl.constexpr):
    """amax / qmax as torch computes it: CUDA torch divides by a Python scalar by multiplying
    with the fp32 reciprocal; CPU torch divides (correctly rounded)."""
    if SCALE_BY_RECIP:
        s = amax * inv_qmax
    else:
        s = tl.math.div_rn(amax, tl.zeros_like(amax) + qmax)
    return tl.where(amax > 0, s, 1.0)


@triton.jit
def bad_rows(s, mask_m):
    """1 where a row's scale is +inf (its input held NaN/Inf), else 0; (BLOCK_M,) int32."""
    return tl.where(mask_m & (s == float("inf")), 1, 0)


@triton.jit
def flag_nonfinite(flag_ptr, flag_id, bad):
    """Record ``flag_id`` in the device flag (atomic min) if any row of this program was bad."""
    tl.atomic_min(flag_ptr, flag_id, mask=tl.max(bad, axis=0) > 0)
