"""8-bit attention on Hopper, written in Gluon: the Triton kernel's numerics with the P·V of one key tile
in flight while the next tile's softmax runs.

Why this file exists: the Triton kernel (:mod:`.attention_triton`) runs its loop strictly in order —
wait for Q·Kᵀ of tile j, softmax, P·V of tile j, wait. Gluon, Triton's lower-level dialect (shipped with
Triton ≥ 3.5), exposes the asynchronous ``wgmma``, its waits, TMA and mbarriers directly. This kernel
issues, for key tile j,

    S_j = Q·K_jᵀ (async)  →  O += P_{j−1}·V_{j−1} (async)  →  wait for S_j only
    →  softmax of S_j  →  wait for O  →  O *= α_j  →  P_j to shared memory  →  refill the freed K/V slot

K and Vᵀ tiles arrive by TMA into a ring of ``stages`` shared-memory slots (3 at head_dim 128, 2 at 64),
each refilled as soon as the MMAs reading it are done; two programs (one warpgroup each) share an SM.
``quant_attention`` runs it by default on sm_90 (``impl="auto"``), where it measured faster than the
Triton kernel (docs/ATTENTION.md).

Numerics: those of :mod:`.attention_ref` and of the Triton kernel (same codes, same per-key K scales, 448 in
the exponent, e4m3 P, fp32 running accumulator, key-padding masks as a per-key bias), with one difference
in the order of fp32 operations: the Triton kernel computes O_j = P_j·V_j + α_j·O_{j−1} (the tensor cores
add the product to the rescaled accumulator), this kernel O_j = α_{j+1}·(O_{j−1} + P_j·V_j) — the same sum,
rounded differently in the last bits (on the benchmark shapes and the embedded model the bf16 outputs
came out identical). Tests compare both against the reference with the Triton kernel's tolerance.

Scope: Hopper (sm_90), head_dim 64 or 128, more than one key tile; ``attention_triton.choose_impl`` falls
back to the Triton kernel elsewhere. Gluon kernels do not run in Triton's interpreter: the CPU suite
compiles this one for sm_90a (ptxas, no GPU needed) and checks its shared memory, and the GPU suite checks
its outputs against the reference (``tests/test_attention_gluon*.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .attention_ref import LOG2_P_SCALE as _LOG2_P_SCALE, QMAX, QuantKV, first_biased_tile, head_strides

LOG2_P_SCALE = gl.constexpr(_LOG2_P_SCALE)
# Triton 3.6 / 3.9 spellings of the same builtins (the GPU image has 3.6, CI 3.9)
_cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
GLUON_BLOCK_M = 64   # query rows per program: one warpgroup, two programs per SM
# K/Vᵀ ring depth per head_dim; 3 × 32 KB slots at head_dim 128 still fit two programs per SM.
GLUON_STAGES_BY_HEAD_DIM = {128: 3, 64: 2}


@gluon.jit
def _quant_q_rows(q, QMAX_QK: gl.constexpr, QK_INT8: gl.constexpr):
    """Per-token 8-bit codes of a (BLOCK_M, D) fp32 tile (as ``attention_triton._quant_rows``) and each row's amax."""
    amax = gl.maximum(gl.max(gl.abs(q), axis=1), 1e-30)          # = attention_ref.TINY
    y = q * (QMAX_QK / amax)[:, None]
    if QK_INT8:
        r = (y + 12582912.0) - 12582912.0                         # 1.5·2^23: round half to even
        codes = gl.minimum(gl.maximum(r, -127.0), 127.0).to(gl.int8)
    else:
        codes = gl.minimum(gl.maximum(y, -448.0), 448.0).to(gl.float8e4nv)
    return codes, amax


@gluon.jit
def _softmax_tile(s, ks, rowfac, m_i, l_i, n0, Lk, BIASH, QK_INT8: gl.constexpr, MASKED: gl.constexpr,
                  HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """Online-softmax update for one (BLOCK_M, BLOCK_N) score tile in the wgmma accumulator layout.

    The operations of ``attention_triton._attn_tile``: scores t·sk_j·rowfac_i (log2 units) [+ the key bias],
    running max m, p' = 2^(s − (m − log2 448)) = 448·p, row sum l in 448 units. Returns (m, l, p', α)."""
    t = s.to(gl.float32) if QK_INT8 else s                        # exact integer sums → fp32
    sk = t * ks[None, :]
    cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    if HAS_BIAS:                                                  # −inf past Lk and on masked keys
        sb = sk * rowfac[:, None] + gl.load(BIASH + cols)[None, :]
        m_new = gl.maximum(m_i, gl.max(sb, axis=1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)     # fully masked so far: p = 0, not NaN
        p = gl.exp2(sb - (m_use - LOG2_P_SCALE)[:, None])
    else:
        if MASKED:                                                # the ragged last tile: keys past Lk
            sk = gl.where((cols < Lk)[None, :], sk, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(sk, axis=1) * rowfac)
        m_use = m_new
        p = gl.exp2(sk * rowfac[:, None] - (m_use - LOG2_P_SCALE)[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return m_new, l_i, p, alpha


@gluon.jit
def _issue_kv_load(k_desc, v_desc, k_smem, v_smem, bars, tile, n_tiles, k_row0, v_row0,
                   STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
    """TMA K tile (BLOCK_N, D) and Vᵀ tile (D, BLOCK_N) of key tile ``tile`` into ring slot tile % STAGES
    (nothing past the last tile)."""
    slot = tile % STAGES
    ok = tile < n_tiles
    bar = bars.index(slot)
    mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=ok)
    _tma_load(k_desc, [k_row0 + tile * BLOCK_N, 0], bar, k_smem.index(slot), pred=ok)
    _tma_load(v_desc, [v_row0, tile * BLOCK_N], bar, v_smem.index(slot), pred=ok)


@gluon.jit
def _kv_step(j, q_smem, k_smem, v_smem, p_smem, bars, k_desc, v_desc, KSH, BIASH, acc, m_i, l_i, rowfac,
             n_tiles, Lk, k_row0, v_row0,
             QK_INT8: gl.constexpr, MASKED: gl.constexpr, HAS_BIAS: gl.constexpr, STAGES: gl.constexpr,
             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
    """Key tile j ≥ 1: Q·K_jᵀ and P_{j−1}·V_{j−1} in flight together, softmax of tile j under the latter.
    P_{j−1} is in ``p_smem`` on entry, P_j on return."""
    slot = j % STAGES
    prev = (j - 1) % STAGES
    n0 = j * BLOCK_N
    ks = gl.load(KSH + n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)))   # per-key K scales
    mbarrier.wait(bars.index(slot), (j // STAGES) & 1)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32 if QK_INT8 else gl.float32, s_layout)
    s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    # fp8 P·V: the sm_90 default of no split-K promotion (as tl.dot)
    acc = warpgroup_mma(p_smem, v_smem.index(prev).permute((1, 0)), acc, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))          # Q·K_jᵀ done; P·V still running
    m_i, l_i, p, alpha = _softmax_tile(s, ks, rowfac, m_i, l_i, n0, Lk, BIASH, QK_INT8, MASKED, HAS_BIAS, BLOCK_N,
                                       s_layout)
    p8 = p.to(gl.float8e4nv)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))      # P_{j−1}·V_{j−1} done: p_smem, slot free
    _store_p(p_smem, p8)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    # slot `prev` is free now (its V was read by the P·V just waited for): refill it
    _issue_kv_load(k_desc, v_desc, k_smem, v_smem, bars, j + STAGES - 1, n_tiles, k_row0, v_row0, STAGES, BLOCK_N)
    return acc, m_i, l_i


@gluon.jit
def _store_p(p_smem, p8):
    """P (e4m3) into shared memory as the next P·V's A operand, visible to the tensor cores (async proxy)
    and written by all four warps before any of them issues the wgmma."""
    p_smem.store(p8)
    fence_async_shared()
    _cta_barrier()


@gluon.jit
def _attn_fwd_gluon_kernel(Q, k_desc, KS, v_desc, VS, VOFF, KM, BIAS, BIAS_FROM, O, LSE,
                           Lq, Lk, Lkp, H, sqb, sql, sqh, sob, sol, soh, sbb, sbh, sfb, sfh, qk_scale,
                           D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                           QK_INT8: gl.constexpr, QMAX_QK: gl.constexpr, RAGGED: gl.constexpr,
                           RETURN_LSE: gl.constexpr, HAS_BIAS: gl.constexpr):
    """Grid: (query tiles, B·H); one warpgroup (4 warps). ``k_desc``: (B·H·Lkp, D) codes of K, tiles
    (BLOCK_N, D); ``v_desc``: (B·H·D, Lkp) codes of Vᵀ, tiles (D, BLOCK_N); ``BIAS``: with ``HAS_BIAS``, the
    key bias (B, 1|H, Lkp) in log2 units, −inf past Lk (``attention_triton.quant_attention`` builds it), and
    ``BIAS_FROM`` (B, 1|H) int32 the first key tile whose bias is non-zero: tiles 1 … before it run unbiased;
    Lk > BLOCK_N."""
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    # layouts: wgmma accumulators of S (BLOCK_M, BLOCK_N) and O (BLOCK_M, D), 16×N×32 instructions over
    # 4 warps stacked along M
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 32])
    q_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1],
                                              order=[1, 0])
    q_dtype: gl.constexpr = gl.int8 if QK_INT8 else gl.float8e4nv
    q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], q_dtype)

    # shared memory: Q codes, a ring of K / Vᵀ tiles, one barrier per ring slot
    q_smem = gl.allocate_shared_memory(q_dtype, [BLOCK_M, D], q_smem_layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, D, BLOCK_N], v_desc.layout)
    p_smem = gl.allocate_shared_memory(gl.float8e4nv, [BLOCK_M, BLOCK_N],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], gl.float8e4nv))
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    n_tiles = Lkp // BLOCK_N
    k_row0 = bh * Lkp                                             # this head's first row in the descriptors
    v_row0 = bh * D
    for i in gl.static_range(STAGES):                             # fill the ring first: the loads overlap Q's pass
        _issue_kv_load(k_desc, v_desc, k_smem, v_smem, bars, i, n_tiles, k_row0, v_row0, STAGES, BLOCK_N)

    # Q tile (BLOCK_M, D) from the model layout (B, Lq, H, D), quantized per token in registers
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_layout))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, q_layout))
    row_ok = (offs_m < Lq)[:, None]
    q = gl.load(Q + b.to(gl.int64) * sqb + offs_m[:, None].to(gl.int64) * sql + h * sqh + offs_d[None, :],
                mask=row_ok, other=0.0).to(gl.float32)
    codes, amax = _quant_q_rows(q, QMAX_QK, QK_INT8)
    q_smem.store(codes)
    fence_async_shared()
    _cta_barrier()
    # round qk_scale to fp32 (it arrives as fp64 from torch.compile launches), as the Triton kernel
    qk32 = (gl.zeros_like(amax) + qk_scale).to(gl.float32)
    rowfac = gl.convert_layout((amax / QMAX_QK) * qk32, gl.SliceLayout(1, s_layout))   # sq_i · scale · log2 e
    shift = gl.zeros_like(amax)
    if RETURN_LSE:   # scores are taken against K − mean(K): lse adds q·mean(K)·scale back (fp32 q)
        shift = gl.sum(q * gl.load(KM + bh * D + offs_d)[None, :], axis=1) * (qk32 * 0.6931471805599453)

    # key tile 0: Q·K_0ᵀ and its softmax; the accumulator starts at zero (its α is 0)
    KSH = KS + bh.to(gl.int64) * Lkp                              # per-key K scales of this head
    BIASH = BIAS + b.to(gl.int64) * sbb + h * sbh                 # this head's key bias (if any)
    ks = gl.load(KSH + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    mbarrier.wait(bars.index(0), 0)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32 if QK_INT8 else gl.float32, s_layout)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    m_i, l_i, p, alpha = _softmax_tile(s, ks, rowfac, m_i, l_i, 0, Lk, BIASH, QK_INT8, False, HAS_BIAS, BLOCK_N,
                                       s_layout)
    _store_p(p_smem, p.to(gl.float8e4nv))
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)

    # key tiles 1 … n−1: with a bias, unbiased ones up to the first biased tile (−inf past Lk makes the ragged
    # last tile one), then biased ones; without, full tiles and then the ragged last one, if any, with its mask
    if HAS_BIAS:
        n_plain = gl.maximum(gl.load(BIAS_FROM + b * sfb + h * sfh), 1)
        n_full = n_tiles
    else:
        n_plain = n_tiles - 1 if RAGGED else n_tiles
        n_full = n_plain
    for j in range(1, n_plain):
        acc, m_i, l_i = _kv_step(j, q_smem, k_smem, v_smem, p_smem, bars, k_desc, v_desc, KSH, BIASH, acc, m_i,
                                 l_i, rowfac, n_tiles, Lk, k_row0, v_row0, QK_INT8, False, False, STAGES,
                                 BLOCK_M, BLOCK_N, s_layout, o_layout)
    for j in range(n_plain, n_full):                              # biased tiles (an empty range without a bias)
        acc, m_i, l_i = _kv_step(j, q_smem, k_smem, v_smem, p_smem, bars, k_desc, v_desc, KSH, BIASH, acc, m_i,
                                 l_i, rowfac, n_tiles, Lk, k_row0, v_row0, QK_INT8, False, HAS_BIAS, STAGES,
                                 BLOCK_M, BLOCK_N, s_layout, o_layout)
    if RAGGED and not HAS_BIAS:
        acc, m_i, l_i = _kv_step(n_tiles - 1, q_smem, k_smem, v_smem, p_smem, bars, k_desc, v_desc, KSH, BIASH,
                                 acc, m_i, l_i, rowfac, n_tiles, Lk, k_row0, v_row0, QK_INT8, True, HAS_BIAS,
                                 STAGES, BLOCK_M, BLOCK_N, s_layout, o_layout)
    # the last tile's P·V
    last = (n_tiles - 1) % STAGES
    acc = warpgroup_mma(p_smem, v_smem.index(last).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    # epilogue: out = acc · v_scale / l + v_offset in the model layout (acc and l both in 448 units)
    offs_mo = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    offs_do = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    l_c = gl.convert_layout(gl.maximum(l_i, 1e-30), gl.SliceLayout(1, o_layout))
    vs = gl.load(VS + bh * D + offs_do)
    out = acc * vs[None, :] / l_c[:, None] + gl.load(VOFF + bh * D + offs_do)[None, :]
    gl.store(O + b.to(gl.int64) * sob + offs_mo[:, None].to(gl.int64) * sol + h * soh + offs_do[None, :],
             out.to(O.dtype.element_ty), mask=(offs_mo < Lq)[:, None])
    if RETURN_LSE:
        lse = (m_i + gl.log2(gl.maximum(l_i, 1e-30)) - LOG2_P_SCALE) * 0.6931471805599453 \
            + gl.convert_layout(shift, gl.SliceLayout(1, s_layout))
        offs_ml = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        gl.store(LSE + (b * Lq + offs_ml) * H + h, lse, mask=offs_ml < Lq)


def gluon_supported(q: torch.Tensor, lk: int, block_n: int) -> bool:
    """Whether :func:`attend_gluon` handles this call: a Hopper GPU (sm_90), head_dim 64/128, more than one
    key tile (key-padding masks come as a bias, as for the Triton kernel)."""
    if q.device.type != "cuda" or q.shape[-1] not in (64, 128) or lk <= block_n:
        return False
    return torch.cuda.get_device_capability(q.device) == (9, 0)


def kv_descriptors_gluon(kv: QuantKV, block_n: int):
    """Gluon TMA descriptors of the K codes (B·H·Lkp, D), tiles (block_n, D), and the Vᵀ codes
    (B·H·D, Lkp), tiles (D, block_n), with the wgmma-compatible (swizzled) shared layouts."""
    B, H, lkp, D = kv.k8.shape
    k2 = kv.k8.view(B * H * lkp, D)
    v2 = kv.v8t.view(B * H * D, lkp)
    k_dtype = gl.int8 if kv.k8.dtype == torch.int8 else gl.float8e4nv
    k_layout = gl.NVMMASharedLayout.get_default_for([block_n, D], k_dtype)
    v_layout = gl.NVMMASharedLayout.get_default_for([D, block_n], gl.float8e4nv)
    return (TensorDescriptor.from_tensor(k2, [block_n, D], k_layout),
            TensorDescriptor.from_tensor(v2, [D, block_n], v_layout))


def attend_gluon(q: torch.Tensor, kv: QuantKV, scale: float, qk_format: str, return_lse: bool = False,
                 bias: Optional[torch.Tensor] = None, stages: Optional[int] = None,
                 bias_from: Optional[torch.Tensor] = None):
    """The Gluon kernel on pre-quantized K/V (``attention_triton.quantize_kv``): ``q`` (B, Lq, H, D) → ``out``
    (B, Lq, H, D) and ``lse`` (B, Lq, H) fp32 (an empty tensor unless ``return_lse``). ``scale`` includes log2 e.

    A ``torch.library`` custom op, so that ``torch.compile`` treats the launch as one opaque call (Dynamo
    traces Triton kernels but not Gluon ones). ``bias``: the padded key bias (B, 1|H, Lkp), log2 units, as
    ``attention_triton.quant_attention`` prepares it, or None. ``bias_from``: (B, 1|H) int32, the first key
    tile with a non-zero bias; None computes it (:func:`.attention_ref.first_biased_tile`), as
    ``quant_attention`` does by default.
    ``stages``: None takes the head_dim's :data:`GLUON_STAGES_BY_HEAD_DIM` entry."""
    stages = GLUON_STAGES_BY_HEAD_DIM[q.shape[-1]] if stages is None else stages
    if bias is not None and bias_from is None:
        bias_from = first_biased_tile(bias, kv.block_n)
    return _attend_gluon_op(q, kv.k8, kv.k_scale, kv.v8t, kv.v_scale, kv.v_offset, kv.k_mean, bias, bias_from,
                            kv.lk, kv.block_n, float(scale), qk_format, return_lse, stages)


@torch.library.custom_op("dvdquant::attend_gluon", mutates_args=())
def _attend_gluon_op(q: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, v8t: torch.Tensor,
                     v_scale: torch.Tensor, v_offset: torch.Tensor, k_mean: torch.Tensor, bias: Optional[torch.Tensor],
                     bias_from: Optional[torch.Tensor], lk: int, block_n: int, scale: float, qk_format: str,
                     return_lse: bool, stages: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, Lq, H, D = q.shape
    kv = QuantKV(k8, k_scale, v8t, v_scale, v_offset, k_mean, lk, block_n)
    lkp = k8.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((B, Lq, H) if return_lse else (0,), device=q.device, dtype=torch.float32)
    k_desc, v_desc = kv_descriptors_gluon(kv, block_n)
    grid = (triton.cdiv(Lq, GLUON_BLOCK_M), B * H)
    (sbb, sbh), (sfb, sfh) = head_strides(bias), head_strides(bias_from)
    _attn_fwd_gluon_kernel[grid](
        q, k_desc, k_scale, v_desc, v_scale, v_offset, k_mean, v_scale if bias is None else bias,
        v_scale if bias_from is None else bias_from, out, lse if return_lse else out, Lq, lk, lkp, H, q.stride(0),
        q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2), sbb, sbh, sfb, sfh, scale,
        D=D, BLOCK_M=GLUON_BLOCK_M, BLOCK_N=block_n, STAGES=stages,
        QK_INT8=qk_format == "int8", QMAX_QK=QMAX[qk_format], RAGGED=lk % block_n != 0, RETURN_LSE=return_lse,
        HAS_BIAS=bias is not None, num_warps=4)
    return out, lse


@_attend_gluon_op.register_fake
def _(q, k8, k_scale, v8t, v_scale, v_offset, k_mean, bias, bias_from, lk, block_n, scale, qk_format, return_lse,
      stages):
    B, Lq, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, Lq, H) if return_lse else (0,), dtype=torch.float32)


__all__ = ["attend_gluon", "gluon_supported", "kv_descriptors_gluon", "GLUON_BLOCK_M", "GLUON_STAGES_BY_HEAD_DIM"]
