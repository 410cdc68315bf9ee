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
def codes_of_quotient(y, qmax, FP8_FMT: tl.constexpr):
    """Codes of the quotients y = x / s: the int grid (round half to even, clamped to ±qmax) or the e4m3 grid."""
    if FP8_FMT:
        return round_e4m3(y)
    r = (y + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(r, -qmax), qmax)


@triton.jit
def quantize_codes(x, s, qmax, FP8_FMT: tl.constexpr):
    """Codes of x / s (s broadcast per row), on the int grid or the e4m3 grid."""
    return codes_of_quotient(tl.math.div_rn(x, s[:, None]), qmax, FP8_FMT)


@triton.jit
def recip_ok(s, mask_m):
    """Whether every row's scale allows :func:`quantize_codes_recip`: 2^-100 ≤ s ≤ 2^100 (so 1/s, the
    quotients and the fma residuals stay normal fp32 numbers; NaN/Inf rows fail). A scalar for the
    whole program."""
    good = (s >= 7.888609052210118e-31) & (s <= 1.2676506002282294e30)
    return tl.min(tl.where(mask_m & ~good, 0, 1), axis=0) > 0


@triton.jit
def fma_quotient(x, s, r):
    """x / s, correctly rounded, from r = RN(1/s) (all broadcastable): q = RN(x·r) is within an ulp or two
    of x/s; e = x − q·s is exact in one fma (q·s lies within a few ulps of x); RN(q + e·r) is then the
    correctly rounded quotient (Markstein's correction step). Three fp32 operations instead of IEEE
    ``div.rn``'s subroutine; only where 1/s, the quotients and the residuals are normal (:func:`recip_ok`)."""
    q = x * r
    y = tl.fma(tl.fma(-q, s, x), r, q)
    return tl.where(q == 0.0, q, y)     # x = −0: the fma sum is +0, the quotient −0 (q keeps x's sign)


@triton.jit
def quantize_codes_recip(x, s, r, qmax, FP8_FMT: tl.constexpr):
    """:func:`quantize_codes` with the division by the row scale done by :func:`fma_quotient`; ``r``
    (BLOCK_M,) = RN(1/s). Only for rows where :func:`recip_ok` holds; the GPU tests compare the quotients
    with ``div_rn`` on tie-heavy data."""
    return codes_of_quotient(fma_quotient(x, s[:, None], r[:, None]), qmax, FP8_FMT)


@triton.jit
def fma_div_probe_kernel(x_ptr, s_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Test probe: out[:n] = div_rn(x, s), out[n:] = :func:`fma_quotient` (the quotient
    :func:`quantize_codes_recip` uses)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(x_ptr + i, mask=m, other=1.0)
    s = tl.load(s_ptr + i, mask=m, other=1.0)
    r = tl.math.div_rn(tl.full((BLOCK,), 1.0, tl.float32), s)
    tl.store(out_ptr + i, tl.math.div_rn(x, s), mask=m)
    tl.store(out_ptr + n + i, fma_quotient(x, s, r), mask=m)


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
