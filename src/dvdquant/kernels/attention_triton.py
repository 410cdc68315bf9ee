"""8-bit attention, the Triton kernel: INT8 (or FP8) Q·Kᵀ, FP8 P·V, fp32 online softmax.

The numerics are those of :mod:`.attention_ref` (read its docstring first); this file decides
where each step happens:

* ``_kv_stats_partial_kernel`` + ``_kv_stats_final_kernel``: K mean, V mean and V's per-channel
  amax|V − mean| in one read, summed in a fixed order (chunks of ``STATS_CHUNK`` keys, then the
  chunk partials in order), so a head's statistics are the same bits whatever else is in the call
  (number of heads, layout, context-parallel split).
* ``_quant_kv_kernel`` (key tiles × batch·heads): K centred, int8/e4m3 codes and one fp32 scale
  per key; V centred, per-channel e4m3, written transposed (D, Lkp) as FP8 wgmma wants it, and the
  tile's sum of V's codes per channel; ``_v_offset_kernel`` adds those sums, in a fixed order per head,
  into the output's additive constant v_offset (``attention_ref`` item 5).
* ``_attn_fwd_kernel`` (query tiles × batch·heads): Q read in (B, Lq, H, D) and quantized per
  token in registers, then the FlashAttention loop over key tiles (code dot → one multiply by
  sq·sk·scale·log2 e → running max, exp2 with 448 folded into the exponent, P as e4m3(448·p) →
  dot with the V tile); ragged tiles and key-padding masks by constexpr branches; the epilogue
  rescales by V's channel scales, divides by l, adds v_offset, stores (B, Lq, H, D).

Launch parameters per head_dim: :data:`LAUNCH_BY_HEAD_DIM` (docs/ATTENTION.md says how they were
chosen). Against the reference (same ``block_n``): the same codes except where fp32 results
differ in the last bit and cross an 8-bit rounding boundary (``tests/test_attention*.py``).
Under ``TRITON_INTERPRET=1`` fp32 → e4m3 casts are rounded with exact fp32 arithmetic first
(``EXACT_FP8``: Triton 3.9's interpreter mis-rounds casts that carry into the next binade).
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_ref import (DEFAULT_BLOCK_N, LOG2_P_SCALE as _LOG2_P_SCALE, LOG2E, QMAX, QuantKV, block_n_for,
                            first_biased_tile, head_strides, key_bias)
from .env import interpreting

log = logging.getLogger(__name__)

try:   # the Hopper kernel in Gluon (Triton ≥ 3.5); imported here, not inside functions torch.compile traces
    from . import attention_gluon as _attention_gluon
except (ImportError, AttributeError) as _exc:   # an older Triton: the Triton kernel everywhere
    log.debug("Gluon attention kernel unavailable: %s", _exc)
    _attention_gluon = None

DEFAULT_BLOCK_M = 64
LOG2_P_SCALE = tl.constexpr(_LOG2_P_SCALE)   # e4m3(448·p): 448 as an exponent offset (attention_ref item 4)
STATS_CHUNK = 2048       # keys per partial sum of kv_stats_triton (fixed: part of the numerics)
STATS_TILE = 64          # keys per tile inside a chunk
V_OFFSET_TILES = 32      # key tiles' code sums per step of _v_offset_kernel (fixed: part of the numerics)


@triton.jit
def _e4m3_rne(y):
    """Round fp32 ``y`` (|y| ≤ 448) to the nearest e4m3 value, ties to even, in exact fp32 arithmetic:
    add and subtract 1.5·2^(e+20), whose ulp is e4m3's ulp 2^(e−3) at y's exponent e (e ≥ −6)."""
    bits = y.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    c = (((e + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)
    return (y + c) - c


@triton.jit
def _to_e4m3(y, EXACT_FP8: tl.constexpr):
    if EXACT_FP8:
        y = _e4m3_rne(y)
    return y.to(tl.float8e4nv)


@triton.jit
def _codes(x, inv, QK_INT8: tl.constexpr, EXACT_FP8: tl.constexpr):
    """x · inv (inv = qmax/amax, broadcast) → int8 codes (round half to even) or e4m3 codes."""
    y = x * inv
    if QK_INT8:
        r = (y + 12582912.0) - 12582912.0              # 1.5·2^23: exact round-half-even for |y| < 2^22
        c = tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int8)
    else:
        c = _to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0), EXACT_FP8)
    return c


@triton.jit
def _quant_rows(x, QMAX_QK: tl.constexpr, QK_INT8: tl.constexpr, EXACT_FP8: tl.constexpr):
    """Per-row (per-token) 8-bit codes of a (rows, D) fp32 tile and each row's amax (floored at TINY)."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-30)           # = attention_ref.TINY
    return _codes(x, (QMAX_QK / amax)[:, None], QK_INT8, EXACT_FP8), amax


@triton.jit
def _load_tokens(ptr, b, h, offs_l, offs_d, s_b, s_l, s_h, mask):
    """(len(offs_l), D) fp32 tile of head ``h`` from a (B, L, H, D) tensor with unit D stride; 0 where masked."""
    return tl.load(ptr + b.to(tl.int64) * s_b + offs_l[:, None].to(tl.int64) * s_l + h * s_h + offs_d[None, :],
                   mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _quant_kv_kernel(K, V, KM, VM, VINV, K8, KS, V8T, VPART,
                     Lk, Lkp, H, skb, skl, skh, svb, svl, svh,
                     D: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr, QMAX_QK: tl.constexpr,
                     EXACT_FP8: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    valid = (offs_n < Lk)[:, None]
    # K tile (BLOCK_N, D), centred; rows past Lk are zero and do not move the amax
    k = _load_tokens(K, b, h, offs_n, offs_d, skb, skl, skh, valid)
    k = tl.where(valid, k - tl.load(KM + bh * D + offs_d)[None, :], 0.0)
    k8, amax = _quant_rows(k, QMAX_QK, QK_INT8, EXACT_FP8)        # per key
    tl.store(K8 + bh.to(tl.int64) * Lkp * D + offs_n[:, None] * D + offs_d[None, :], k8)
    tl.store(KS + bh.to(tl.int64) * Lkp + offs_n, amax / QMAX_QK)
    # V tile: centred, per-channel e4m3, stored transposed (D, Lkp)
    v = tl.load(V + b.to(tl.int64) * svb + offs_n[:, None].to(tl.int64) * svl + h * svh + offs_d[None, :],
                mask=valid, other=0.0).to(tl.float32)
    v = (v - tl.load(VM + bh * D + offs_d)[None, :]) * tl.load(VINV + bh * D + offs_d)[None, :]
    v8 = _to_e4m3(tl.where(valid, tl.minimum(tl.maximum(v, -448.0), 448.0), 0.0), EXACT_FP8)
    tl.store(V8T + bh.to(tl.int64) * D * Lkp + offs_d[:, None] * Lkp + offs_n[None, :], tl.trans(v8))
    # this tile's sum of V's codes per channel (zeros past Lk), for v_offset
    tl.store(VPART + (bh.to(tl.int64) * tl.num_programs(0) + pid_n) * D + offs_d, tl.sum(v8.to(tl.float32), axis=0))


@triton.jit
def _v_offset_kernel(VPART, VM, VS, VOFF, n_keys, n_tiles, D: tl.constexpr, TILES: tl.constexpr):
    """One (batch, head): v_offset = mean(V) − v_scale · Σ codes / Lk (:func:`.attention_ref.v_offset_reference`)
    from the key tiles' sums, ``TILES`` tiles at a time in tile order (a fixed order per head)."""
    bh = tl.program_id(0)
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, TILES)
    total = tl.zeros([D], tl.float32)
    for t0 in range(0, n_tiles, TILES):
        t = t0 + offs_t
        part = tl.load(VPART + (bh.to(tl.int64) * n_tiles + t[:, None]) * D + offs_d[None, :],
                       mask=(t < n_tiles)[:, None], other=0.0)
        total += tl.sum(part, axis=0)
    n = (tl.zeros([D], tl.int32) + n_keys).to(tl.float32)       # Lk, as an fp32 block
    shift = tl.math.div_rn(total, n) * tl.load(VS + bh * D + offs_d)
    tl.store(VOFF + bh * D + offs_d, tl.load(VM + bh * D + offs_d) - shift)


@triton.jit
def _attn_tile(q8, rowfac, m_i, l_i, acc, k_src, v_src, KS, BIAS, n0, Lk, k_row0, v_row0,
               D: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, RAGGED: tl.constexpr,
               EXACT_FP8: tl.constexpr, USE_TMA: tl.constexpr):
    """One key tile of the online softmax; returns the updated (m_i, l_i, acc).

    ``USE_TMA``: ``k_src`` / ``v_src`` are tensor descriptors of the (B·H·Lkp, D) codes of K and the
    (B·H·D, Lkp) codes of Vᵀ, read at rows ``k_row0 + n0`` / ``v_row0`` (TMA on Hopper); else they
    are pointers to this head's Kᵀ (D, BLOCK_N) and V (BLOCK_N, D) tiles at key 0. Same tiles, same
    layouts for the MMAs (K's and Vᵀ's rows are the dots' K-major operands), same numbers.

    Scores are t·sk_j (column factor) times rowfac_i (row factor). Without a bias the row factor
    goes into the exponent's fused multiply-add, 2^(sk·rowfac − m), and the tile max is taken on
    t·sk_j and then scaled (rowfac > 0, and rounding is monotonic: the same m) — as many
    operations per score as with one scale per tile.
    """
    ks = tl.load(KS + n0 + tl.arange(0, BLOCK_N))                 # per-key K scales, issued before the dot
    if USE_TMA:
        k = k_src.load([k_row0 + n0, 0]).T                        # (D, BLOCK_N) codes of Kᵀ
    else:
        k = tl.load(k_src + n0 * D)                               # (D, BLOCK_N) codes of Kᵀ
    if QK_INT8:
        t = tl.dot(q8, k, out_dtype=tl.int32).to(tl.float32)     # exact integer sums
    else:
        t = tl.dot(q8, k)
    sk = t * ks[None, :]
    if HAS_BIAS:
        s = sk * rowfac[:, None] + tl.load(BIAS + n0 + tl.arange(0, BLOCK_N))[None, :]   # −inf past Lk / masked
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)      # fully masked so far: p = 0, not NaN
        p = tl.math.exp2(s - (m_use - LOG2_P_SCALE)[:, None])      # 448·p
    else:
        if RAGGED:
            sk = tl.where((n0 + tl.arange(0, BLOCK_N) < Lk)[None, :], sk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sk, axis=1) * rowfac)
        m_use = m_new
        p = tl.math.exp2(sk * rowfac[:, None] - (m_use - LOG2_P_SCALE)[:, None])    # 448·p
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)                         # 448 units
    if USE_TMA:
        v = v_src.load([v_row0, n0]).T                            # (BLOCK_N, D) codes of V
    else:
        v = tl.load(v_src + n0)
    acc = tl.dot(_to_e4m3(p, EXACT_FP8), v, acc * alpha[:, None])  # (BLOCK_M, D) fp32, running accumulator
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(Q, K8, KS, V8T, VS, VOFF, KM, BIAS, BIAS_FROM, O, LSE,
                     Lq, Lk, Lkp, H, sqb, sql, sqh, sob, sol, soh, sbb, sbh, sfb, sfh, qk_scale,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr,
                     QMAX_QK: tl.constexpr, HAS_BIAS: tl.constexpr, RAGGED: tl.constexpr,
                     RETURN_LSE: tl.constexpr, EXACT_FP8: tl.constexpr, USE_TMA: tl.constexpr = False):
    """Grid: (query tiles, B·H). With ``USE_TMA``, ``K8`` / ``V8T`` are tensor descriptors (see _attn_tile).
    With ``HAS_BIAS``: ``BIAS`` (B, 1|H, Lkp) log2 key bias, −inf past Lk; ``BIAS_FROM`` (B, 1|H) int32, the
    first key tile whose bias is non-zero (:func:`.attention_ref.first_biased_tile`): tiles before it take the
    unbiased path."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = (offs_m < Lq)[:, None]
    # Q tile (BLOCK_M, D) from the model layout, quantized per token in registers
    q = _load_tokens(Q, b, h, offs_m, offs_d, sqb, sql, sqh, row_ok)
    q8, amax = _quant_rows(q, QMAX_QK, QK_INT8, EXACT_FP8)        # per token
    # a float argument is fp32 when the kernel is launched directly but fp64 when torch.compile (Inductor)
    # launches it: round it to fp32 here so that every score is computed in fp32 either way
    qk_scale = (tl.zeros_like(amax) + qk_scale).to(tl.float32)
    rowfac = (amax / QMAX_QK) * qk_scale                          # sq_i · scale · log2 e
    shift = tl.zeros([BLOCK_M], tl.float32)
    if RETURN_LSE:   # scores are taken against K − mean(K): lse adds q·mean(K)·scale back (fp32 q)
        shift = tl.sum(q * tl.load(KM + bh * D + offs_d)[None, :], axis=1) * (qk_scale * 0.6931471805599453)
    if USE_TMA:
        k_src, v_src = K8, V8T
    else:
        offs_n = tl.arange(0, BLOCK_N)
        k_src = K8 + bh.to(tl.int64) * Lkp * D + offs_d[:, None] + offs_n[None, :] * D   # Kᵀ tile (D, BLOCK_N), key 0
        v_src = V8T + bh.to(tl.int64) * D * Lkp + offs_n[:, None] + offs_d[None, :] * Lkp  # V tile (BLOCK_N, D), key 0
    k_row0 = bh * Lkp                                             # this head's first row in the descriptors
    v_row0 = bh * D
    ks = KS + bh.to(tl.int64) * Lkp                               # per-key K scales of this head
    bias = BIAS + b.to(tl.int64) * sbb + h * sbh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # unbiased full tiles first: with a bias, up to the first biased tile (the ragged one always is); then the
    # biased tiles, or, without a bias, the ragged last tile with its mask
    if HAS_BIAS:
        n_plain = tl.load(BIAS_FROM + b * sfb + h * sfh) * BLOCK_N
    else:
        n_plain = Lk // BLOCK_N * BLOCK_N
    for n0 in range(0, n_plain, BLOCK_N):
        m_i, l_i, acc = _attn_tile(q8, rowfac, m_i, l_i, acc, k_src, v_src, ks, bias, n0, Lk, k_row0, v_row0,
                                   D, BLOCK_N, QK_INT8, False, False, EXACT_FP8, USE_TMA)
    if HAS_BIAS:
        for n0 in range(n_plain, Lkp, BLOCK_N):
            m_i, l_i, acc = _attn_tile(q8, rowfac, m_i, l_i, acc, k_src, v_src, ks, bias, n0, Lk, k_row0, v_row0,
                                       D, BLOCK_N, QK_INT8, True, False, EXACT_FP8, USE_TMA)
    elif RAGGED:
        m_i, l_i, acc = _attn_tile(q8, rowfac, m_i, l_i, acc, k_src, v_src, ks, bias, n_plain, Lk, k_row0, v_row0,
                                   D, BLOCK_N, QK_INT8, False, True, EXACT_FP8, USE_TMA)
    l_c = tl.maximum(l_i, 1e-30)
    vs = tl.load(VS + bh * D + offs_d)                            # acc and l are both in 448 units
    out = acc * vs[None, :] / l_c[:, None] + tl.load(VOFF + bh * D + offs_d)[None, :]
    tl.store(O + b.to(tl.int64) * sob + offs_m[:, None].to(tl.int64) * sol + h * soh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok)
    if RETURN_LSE:
        lse = (m_i + tl.log2(l_c) - LOG2_P_SCALE) * 0.6931471805599453 + shift
        tl.store(LSE + (b * Lq + offs_m) * H + h, lse, mask=offs_m < Lq)


@triton.jit
def _kv_stats_partial_kernel(K, V, PART, Lk, H, skb, skl, skh, svb, svl, svh,
                             D: tl.constexpr, CHUNK: tl.constexpr, TILE: tl.constexpr):
    """Partials of one chunk of keys for one (batch, head): PART[bh, chunk] = (Σk, Σv, max v, min v), each (D,)."""
    pid_c = tl.program_id(0)
    bh = tl.program_id(1)
    n_chunks = tl.num_programs(0)
    b, h = bh // H, bh % H
    offs_d = tl.arange(0, D)
    k_sum = tl.zeros([D], tl.float32)
    v_sum = tl.zeros([D], tl.float32)
    v_max = tl.full([D], float("-inf"), tl.float32)
    v_min = tl.full([D], float("inf"), tl.float32)
    for t0 in range(0, CHUNK, TILE):                              # fixed order: tile by tile
        offs_n = pid_c * CHUNK + t0 + tl.arange(0, TILE)
        valid = (offs_n < Lk)[:, None]
        k = _load_tokens(K, b, h, offs_n, offs_d, skb, skl, skh, valid)   # (TILE, D), 0 past Lk
        v = _load_tokens(V, b, h, offs_n, offs_d, svb, svl, svh, valid)
        k_sum += tl.sum(k, axis=0)
        v_sum += tl.sum(v, axis=0)
        v_max = tl.maximum(v_max, tl.max(tl.where(valid, v, float("-inf")), axis=0))
        v_min = tl.minimum(v_min, tl.min(tl.where(valid, v, float("inf")), axis=0))
    base = PART + (bh.to(tl.int64) * n_chunks + pid_c) * 4 * D + offs_d
    tl.store(base, k_sum)
    tl.store(base + D, v_sum)
    tl.store(base + 2 * D, v_max)
    tl.store(base + 3 * D, v_min)


@triton.jit
def _kv_stats_final_kernel(PART, KM, VM, VINV, n_keys, n_chunks, D: tl.constexpr):
    """One (batch, head): add the chunk partials in chunk order → k_mean, v_mean, 448/amax|V − v_mean|."""
    bh = tl.program_id(0)
    offs_d = tl.arange(0, D)
    k_sum = tl.zeros([D], tl.float32)
    v_sum = tl.zeros([D], tl.float32)
    v_max = tl.full([D], float("-inf"), tl.float32)
    v_min = tl.full([D], float("inf"), tl.float32)
    for c in range(0, n_chunks):
        base = PART + (bh.to(tl.int64) * n_chunks + c) * 4 * D + offs_d
        k_sum += tl.load(base)
        v_sum += tl.load(base + D)
        v_max = tl.maximum(v_max, tl.load(base + 2 * D))
        v_min = tl.minimum(v_min, tl.load(base + 3 * D))
    n = (tl.zeros([D], tl.int32) + n_keys).to(tl.float32)       # Lk, as an fp32 block
    k_mean = tl.math.div_rn(k_sum, n)
    v_mean = tl.math.div_rn(v_sum, n)
    v_amax = tl.maximum(tl.maximum(v_max - v_mean, v_mean - v_min), 1e-30)   # = attention_ref.TINY
    tl.store(KM + bh * D + offs_d, k_mean)
    tl.store(VM + bh * D + offs_d, v_mean)
    tl.store(VINV + bh * D + offs_d, tl.math.div_rn(tl.full([D], 448.0, tl.float32), v_amax))


def kv_stats_triton(k: torch.Tensor, v: torch.Tensor):
    """:func:`.attention_ref.kv_stats` in a fixed summation order (see module doc): ``k``/``v`` (B, Lk, H, D)
    with unit D stride → k_mean, v_mean, v_inv, each (B, H, D) fp32. A head's result does not depend on
    the other heads in the call or on the strides (context-parallel invariant)."""
    B, Lk, H, D = k.shape
    n_chunks = triton.cdiv(Lk, STATS_CHUNK)
    part = torch.empty(B * H, n_chunks, 4, D, device=k.device, dtype=torch.float32)
    _kv_stats_partial_kernel[(n_chunks, B * H)](
        k, v, part, Lk, H, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        D=D, CHUNK=STATS_CHUNK, TILE=STATS_TILE, num_warps=4)
    k_mean, v_mean, v_inv = (torch.empty(B, H, D, device=k.device, dtype=torch.float32) for _ in range(3))
    _kv_stats_final_kernel[(B * H,)](part, k_mean, v_mean, v_inv, Lk, n_chunks, D=D, num_warps=1)
    return k_mean, v_mean, v_inv


def quantize_kv(k: torch.Tensor, v: torch.Tensor, qk_format: str = "int8", block_n: int = DEFAULT_BLOCK_N) -> QuantKV:
    """Triton version of :func:`.attention_ref.quantize_kv_reference` (same outputs)."""
    B, Lk, H, D = k.shape
    nb = triton.cdiv(Lk, block_n)
    lkp = nb * block_n
    k_mean, v_mean, v_inv = kv_stats_triton(k, v)
    dev = k.device
    k8 = torch.empty(B, H, lkp, D, device=dev, dtype=torch.int8 if qk_format == "int8" else torch.float8_e4m3fn)
    ks = torch.empty(B, H, lkp, device=dev, dtype=torch.float32)             # per-key K scales
    v8t = torch.empty(B, H, D, lkp, device=dev, dtype=torch.float8_e4m3fn)
    v_part = torch.empty(B * H, nb, D, device=dev, dtype=torch.float32)    # per-tile sums of V's codes
    _quant_kv_kernel[(nb, B * H)](
        k, v, k_mean, v_mean, v_inv, k8, ks, v8t, v_part, Lk, lkp, H,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        D=D, BLOCK_N=block_n, QK_INT8=qk_format == "int8", QMAX_QK=QMAX[qk_format], EXACT_FP8=interpreting(),
        num_warps=4)
    v_scale = 1.0 / v_inv
    v_offset = torch.empty_like(v_mean)
    _v_offset_kernel[(B * H,)](v_part, v_mean, v_scale, v_offset, Lk, nb, D=D, TILES=V_OFFSET_TILES, num_warps=4)
    return QuantKV(k8, ks, v8t, v_scale, v_offset, k_mean, Lk, block_n)


# Launch configs per head_dim: query tile rows, warps, pipeline stages, and ``use_tma`` (K/V tiles through
# tensor descriptors on sm90+); the key tile comes from attention_ref.block_n_for. Any of them leaves the
# output unchanged; docs/ATTENTION.md ("Launch") says how they were chosen. The tile size to change is here.
LAUNCH_BY_HEAD_DIM = {128: dict(block_m=DEFAULT_BLOCK_M, num_warps=4, num_stages=3, use_tma=True),
                      64: dict(block_m=DEFAULT_BLOCK_M, num_warps=4, num_stages=3, use_tma=False)}


# Which kernel quant_attention runs where both can ("auto"): see gluon_available / attention_gluon.py.
DEFAULT_IMPL = "auto"
IMPLS = ("auto", "triton", "gluon")
# "auto" takes the Gluon kernel only from this Triton on: Gluon's API moves between releases, and 3.6 is the
# oldest one its outputs were tested with on a GPU (CI compiles it with 3.9); impl="gluon" tries any version.
GLUON_AUTO_MIN_TRITON = (3, 6)


def _major_minor(version: str) -> tuple:
    """``"3.6.0+git…"`` → (3, 6)."""
    parts = []
    for p in version.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


TRITON_VERSION = _major_minor(triton.__version__)   # once, at import (torch.compile traces choose_impl)


def gluon_available() -> bool:
    """Whether this Triton ships Gluon's Hopper API (``attention_gluon`` imported; Triton ≥ 3.5)."""
    return _attention_gluon is not None


def choose_impl(impl: Optional[str], q: torch.Tensor, lk: int, block_n: int) -> str:
    """``"gluon"`` or ``"triton"`` for this call. ``impl=None`` takes :data:`DEFAULT_IMPL`; ``"auto"`` picks
    the Gluon kernel where it applies (sm_90, head_dim 64/128, > 1 key tile, not interpreting, Triton ≥
    :data:`GLUON_AUTO_MIN_TRITON`);
    ``"gluon"`` insists and raises where it cannot run."""
    impl = DEFAULT_IMPL if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        return "triton"
    ok = not interpreting() and gluon_available() and _attention_gluon.gluon_supported(q, lk, block_n)
    if impl == "auto" and TRITON_VERSION < GLUON_AUTO_MIN_TRITON:
        return "triton"
    if impl == "gluon" and not ok:
        raise ValueError(f"impl={impl!r} needs a Hopper (sm_90) GPU, Triton with Gluon, head_dim 64/128 "
                         f"and more than {block_n} keys (got device {q.device}, head_dim {q.shape[-1]}, {lk} keys)")
    return "gluon" if ok else "triton"


def default_use_tma(device: torch.device, head_dim: int) -> bool:
    """Whether :func:`quant_attention` reads K/V through TMA by default: where the head_dim's config
    asks for it and the GPU has a tensor-memory accelerator (sm90+; not in the interpreter)."""
    if not LAUNCH_BY_HEAD_DIM[head_dim]["use_tma"] or device.type != "cuda" or interpreting():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def kv_descriptors(kv: QuantKV, block_n: int):
    """Tensor descriptors of the K codes as (B·H·Lkp, D) and the Vᵀ codes as (B·H·D, Lkp), tiles of
    (block_n, D) and (D, block_n): what ``_attn_fwd_kernel`` reads with ``USE_TMA``."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    B, H, lkp, D = kv.k8.shape
    k2 = kv.k8.view(B * H * lkp, D)
    v2 = kv.v8t.view(B * H * D, lkp)
    return TensorDescriptor.from_tensor(k2, [block_n, D]), TensorDescriptor.from_tensor(v2, [D, block_n])


def quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, qk_format: str = "int8", block_n: Optional[int] = None,
                    block_m: Optional[int] = None, num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                    return_lse: bool = False, use_tma: Optional[bool] = None, impl: Optional[str] = None,
                    bias_tail: bool = True):
    """8-bit attention: ``q`` (B, Lq, H, D), ``k``/``v`` (B, Lk, H, D) → ``out`` (B, Lq, H, D) [, lse (B, Lq, H)].

    Thin launcher: checks, allocates, runs the K/V pass and the attention kernel. ``attn_mask``:
    a key-padding mask (see :func:`.attention_ref.key_bias`). Last dims must be contiguous.
    ``block_n`` / ``block_m`` / ``num_warps`` / ``num_stages``: None takes the head_dim's tuned
    config (:data:`LAUNCH_BY_HEAD_DIM`, :func:`.attention_ref.block_n_for`). ``use_tma``: read the K/V
    tiles through tensor descriptors (None: :func:`default_use_tma`); the result is the same either way.
    ``impl``: ``"triton"``, ``"gluon"`` (:mod:`.attention_gluon`, Hopper only) or ``"auto"``; None takes
    :data:`DEFAULT_IMPL` (:func:`choose_impl`). The Gluon kernel ignores the launch arguments above except
    ``block_n``. ``bias_tail``: with a mask, key tiles before the first one with a non-zero bias run without
    it (:func:`.attention_ref.first_biased_tile`); False applies the bias on every tile (the A/B of
    ``benchmarks/bench_attention.py --mask``).
    """
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if qk_format not in QMAX:
        raise ValueError(f"qk_format must be one of {tuple(QMAX)}, got {qk_format!r}")
    if D not in (64, 128) or k.shape != (B, Lk, H, D) or v.shape != k.shape:
        raise ValueError(f"unsupported shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    cfg = LAUNCH_BY_HEAD_DIM[D]
    block_n = block_n or block_n_for(D)
    chosen = choose_impl(impl, q, Lk, block_n)                    # before any work: a bad impl raises here
    c = (scale if scale is not None else 1.0 / math.sqrt(D)) * LOG2E
    block_m, num_warps, num_stages = (block_m or cfg["block_m"], num_warps or cfg["num_warps"],
                                      num_stages or cfg["num_stages"])
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    kv = quantize_kv(k, v, qk_format, block_n)
    lkp = kv.k8.shape[2]
    bias = key_bias(attn_mask, B, H, Lk)
    bias_from = None
    if bias is not None:                                          # (B, 1|H, Lkp), log2 units, −inf past Lk
        padded = torch.full((B, bias.shape[1], lkp), float("-inf"), device=q.device)
        padded[..., :Lk] = bias * LOG2E
        bias = padded
        bias_from = first_biased_tile(bias, block_n) if bias_tail else torch.zeros(
            bias.shape[:2], dtype=torch.int32, device=q.device)                  # (B, 1|H)
    if chosen == "gluon":
        out, lse = _attention_gluon.attend_gluon(q, kv, c, qk_format, return_lse, bias=bias, bias_from=bias_from)
        return (out, lse) if return_lse else out
    (sbb, sbh), (sfb, sfh) = head_strides(bias), head_strides(bias_from)
    if bias is None:
        bias, bias_from = kv.v_scale, kv.v_scale                 # unused pointers
    out = torch.empty_like(q)
    lse = torch.empty(B, Lq, H, device=q.device, dtype=torch.float32) if return_lse else out
    grid = (triton.cdiv(Lq, block_m), B * H)
    tma = default_use_tma(q.device, D) if use_tma is None else use_tma
    k_src, v_src = kv_descriptors(kv, block_n) if tma else (kv.k8, kv.v8t)
    _attn_fwd_kernel[grid](
        q, k_src, kv.k_scale, v_src, kv.v_scale, kv.v_offset, kv.k_mean, bias, bias_from, out, lse,
        Lq, Lk, lkp, H, q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        sbb, sbh, sfb, sfh, c,
        D=D, BLOCK_M=block_m, BLOCK_N=block_n, QK_INT8=qk_format == "int8", QMAX_QK=QMAX[qk_format],
        HAS_BIAS=attn_mask is not None, RAGGED=Lk % block_n != 0, RETURN_LSE=return_lse,
        EXACT_FP8=interpreting(), USE_TMA=tma, num_warps=num_warps, num_stages=num_stages)
    return (out, lse) if return_lse else out


__all__ = ["quant_attention", "quantize_kv", "kv_stats_triton", "kv_descriptors", "DEFAULT_BLOCK_M", "DEFAULT_BLOCK_N"]
