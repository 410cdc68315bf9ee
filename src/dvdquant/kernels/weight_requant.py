"""Dynamic smoothing's per-sample weight re-quantization in one Triton kernel (the FP8 / INT8 path).

For each sample g and weight row n, from the int8 master m (N, K), its row scale (N, 1), the column
maxima (K,) and the sample's smoothing scales s_g (K,), the kernel computes what
:func:`dvdquant.numerics.smoothing.smoothed_weight_params` computes (group None), bit for bit::

    w   = ((m · scale_n) · max(colmax_k, 1e-12)) · s_g[k]          fp32, in this order
    w  ← hadamard_rotate_exact(w, R)     snap per (row, R-segment), exact ±1 sums (tl.dot), · fp32(1/√R)
    lo = min(min_k w, 0),  hi = max(max_k w, 0)
    asymmetric: Δ = (hi − lo)/qmax (1 where 0), z = clamp(round(−lo/Δ), 0, qmax),  qmax = 2^b − 1
    symmetric:  Δ = max(−lo, hi)/(2^(b−1) − 1) (1 where 0), z = 2^(b−1)
    out = clamp(round(w/Δ) + z, 0, qmax) − z      stored as int8 or e4m3 (exact integers), and Δ (fp32)

— the layout the FP8 / INT8 GEMMs take (:mod:`.fp8`: W_int = q − z, per-row steps Δ). Two passes over
each row block (min/max, then codes) recompute the rotation instead of storing it. Divisions are
``div_rn``; a division by the scalar qmax multiplies by fp32(1/qmax) on CUDA, as CUDA torch does
(``SCALE_BY_RECIP``, like :func:`.quant_jit.scale_of`); rounding half to even by the magic-number
trick; fp contraction is off (an fma of the decode's last product with the snap's add would change bits).
In-kernel rotations: R a power of two, 16 ≤ R ≤ 128, K a multiple of max(R, 64)
(:func:`.execution.fusable_rotation`); other layers run the simulated path. Rows holding NaN/Inf
write ``flag_id`` into the device flag (:mod:`.finite`); the reference raises NonFiniteError.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..errors import ConfigError
from ..numerics.hadamard import cached_hadamard, inv_sqrt_r
from ..numerics.smoothing import COLMAX_FLOOR
from .env import interpreting
from .execution import fusable_rotation
from .quant_jit import flag_nonfinite
from .triton_act_quant import _hadamard_tile, _rotate_snapped, snap_magic

BLOCK_N = 32          # weight rows per program
UNROTATED_BLOCK_K = 64


@triton.jit
def _smoothed_tile(m_ptr, msc, cm_ptr, s_ptr, h, rows, mask_n, k0, K, stride_mn, inv_sqrt_r,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROTATE: tl.constexpr, ROT_MODE: tl.constexpr,
                   ROT_R: tl.constexpr):
    """One (BLOCK_N, BLOCK_K) tile of (decoded master · s_g) · H in fp32 (masked entries 0)."""
    cols = k0 + tl.arange(0, BLOCK_K)
    mask_k = cols < K
    m = tl.load(m_ptr + rows[:, None] * stride_mn + cols[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0)
    cm = tl.load(cm_ptr + cols, mask=mask_k, other=0.0)
    sg = tl.load(s_ptr + cols, mask=mask_k, other=0.0)
    w = ((m.to(tl.float32) * msc[:, None]) * cm[None, :]) * sg[None, :]
    if ROTATE:
        magic = snap_magic(w, BLOCK_N, BLOCK_K, ROT_R)
        if ROT_R == BLOCK_K:
            w = (w + magic[:, None]) - magic[:, None]
        else:
            w = (w + magic) - magic
        w = _rotate_snapped(w, h, inv_sqrt_r, ROT_MODE, True)
    return w


@triton.jit
def _round_even(y):
    return (y + 12582912.0) - 12582912.0          # |y| < 2^22: round half to even


@triton.jit(do_not_specialize=["flag_id"])
def weight_requant_kernel(m_ptr, msc_ptr, cm_ptr, s_ptr, h_ptr, out_ptr, delta_ptr, flag_ptr, flag_id,
                          N, K, stride_mn, stride_sg, stride_on, inv_sqrt_r, qmax, inv_qmax, half,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROTATE: tl.constexpr,
                          ROT_MODE: tl.constexpr, ROT_R: tl.constexpr, SYMMETRIC: tl.constexpr,
                          SCALE_BY_RECIP: tl.constexpr, HAS_FLAG: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), G): program (i, g) writes rows g·N + [i·BLOCK_N, (i+1)·BLOCK_N) of the
    (G·N, K) output and of Δ (G·N,)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    mask_n = rows < N
    s_row = s_ptr + g * stride_sg
    msc = tl.load(msc_ptr + rows, mask=mask_n, other=0.0)
    h = None
    if ROTATE:
        hk = tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + hk[:, None] * BLOCK_K + hk[None, :])
    lo = tl.zeros((BLOCK_N,), dtype=tl.float32)       # min(row, 0) and max(row, 0): start at 0
    hi = tl.zeros((BLOCK_N,), dtype=tl.float32)
    bad = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        w = _smoothed_tile(m_ptr, msc, cm_ptr, s_row, h, rows, mask_n, k0, K, stride_mn, inv_sqrt_r,
                           BLOCK_N, BLOCK_K, ROTATE, ROT_MODE, ROT_R)
        lo = tl.minimum(lo, tl.min(w, axis=1))
        hi = tl.maximum(hi, tl.max(w, axis=1))
        bad = tl.maximum(bad, tl.max(tl.where(tl.abs(w) < float("inf"), 0, 1), axis=1))
    if SYMMETRIC:
        amax = tl.maximum(-lo, hi)
        if SCALE_BY_RECIP:
            d = amax * inv_qmax
        else:
            d = tl.math.div_rn(amax, tl.zeros_like(amax) + qmax)
        d = tl.where(d > 0, d, 1.0)
        z = tl.zeros_like(d) + half
        top = 2.0 * half - 1.0
    else:
        if SCALE_BY_RECIP:
            d = (hi - lo) * inv_qmax
        else:
            d = tl.math.div_rn(hi - lo, tl.zeros_like(hi) + qmax)
        d = tl.where(d > 0, d, 1.0)
        z = tl.minimum(tl.maximum(_round_even(tl.math.div_rn(-lo, d)), 0.0), qmax)
        top = qmax
    out_rows = g * N + rows
    for k0 in range(0, K, BLOCK_K):
        w = _smoothed_tile(m_ptr, msc, cm_ptr, s_row, h, rows, mask_n, k0, K, stride_mn, inv_sqrt_r,
                           BLOCK_N, BLOCK_K, ROTATE, ROT_MODE, ROT_R)
        q = _round_even(tl.math.div_rn(w, d[:, None])) + z[:, None]
        q = tl.minimum(tl.maximum(q, 0.0), top)
        cols = k0 + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + out_rows[:, None].to(tl.int64) * stride_on + cols[None, :],
                 (q - z[:, None]).to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & (cols[None, :] < K))
    tl.store(delta_ptr + out_rows, d, mask=mask_n)
    if HAS_FLAG:
        flag_nonfinite(flag_ptr, flag_id, tl.where(mask_n, bad, 0))


def requant_weight(master: torch.Tensor, master_scale: torch.Tensor, colmax: torch.Tensor, s: torch.Tensor, *,
                   bits: int, symmetric: bool, rotation_block: Optional[int], codes_dtype: torch.dtype = torch.int8,
                   nonfinite_flag: Optional[torch.Tensor] = None, flag_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample g (row of ``s`` (G, K) fp32): (q − z) (G·N, K) ``codes_dtype`` and Δ (G·N, 1) fp32 of
    Q_minmax(W·diag(s_g)·H) from the int8 ``master`` (N, K), ``master_scale`` (N, 1) and ``colmax`` (K,)
    (module doc). ``codes_dtype``: int8 (bits ≤ 7) or float8_e4m3fn (bits ≤ 4: exact integers)."""
    n, k = master.shape
    if master.dtype != torch.int8 or s.dim() != 2 or s.shape[1] != k:
        raise ConfigError(f"requant_weight: int8 master (N, K) and s (G, K), got {master.dtype} {tuple(master.shape)}, "
                          f"{tuple(s.shape)}")
    max_bits = {torch.int8: 7, torch.float8_e4m3fn: 4}.get(codes_dtype, 0)
    if not 2 <= bits <= max_bits:
        raise ConfigError(f"{bits}-bit weight integers are not exact in {codes_dtype}")
    r = rotation_block or None
    if not fusable_rotation(k, r, None):
        raise ConfigError(f"rotation of order {r} cannot run in the weight kernel for K={k}")
    g = s.shape[0]
    out = torch.empty(g * n, k, dtype=codes_dtype, device=master.device)
    delta = torch.empty(g * n, 1, dtype=torch.float32, device=master.device)
    if g == 0 or n == 0:
        return out, delta
    tile = max(r, 64) if r else UNROTATED_BLOCK_K
    rot_mode = 0 if interpreting() else 2                # snapped tiles: two exact bf16 parts
    h = _hadamard_tile(cached_hadamard(r, master.device), tile, torch.float32 if rot_mode == 0 else torch.bfloat16,
                       master.device) if r else master
    qmax = float((2 ** (bits - 1) - 1) if symmetric else (2 ** bits - 1))
    inv_qmax = float(torch.tensor(1.0, dtype=torch.float32) / qmax)
    flag = nonfinite_flag if nonfinite_flag is not None else delta
    master = master if master.stride(1) == 1 else master.contiguous()
    s = s.float().contiguous()
    cm = colmax.float().clamp_min(COLMAX_FLOOR).contiguous()
    grid = (triton.cdiv(n, BLOCK_N), g)
    weight_requant_kernel[grid](
        master, master_scale.float().reshape(n).contiguous(), cm, s, h, out, delta, flag, int(flag_id),
        n, k, master.stride(0), s.stride(0), out.stride(0), inv_sqrt_r(r) if r else 1.0, qmax, inv_qmax,
        float(2 ** (bits - 1)), BLOCK_N=BLOCK_N, BLOCK_K=tile, ROTATE=bool(r), ROT_MODE=rot_mode, ROT_R=r or tile,
        SYMMETRIC=bool(symmetric), SCALE_BY_RECIP=master.is_cuda, HAS_FLAG=nonfinite_flag is not None,
        num_warps=4, num_stages=2, enable_fp_fusion=False)
    return out, delta


__all__ = ["requant_weight", "weight_requant_kernel"]
