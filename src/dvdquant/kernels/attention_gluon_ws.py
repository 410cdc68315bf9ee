"""8-bit attention on Hopper, warp-specialized: FlashAttention-3's ping-pong of two consumer warpgroups.

Why this file exists: :mod:`.attention_gluon` overlaps P·V with the softmax inside one warpgroup, but
ptxas moves the wait for P·V up to the softmax's first shuffle/exponential (its SASS shows the
``WARPGROUP.DEPBAR`` there), so little overlaps. FlashAttention-3's other technique does not depend on
instruction scheduling: two *consumer warpgroups* share a CTA and take turns on the tensor cores —
warpgroup 0 issues its Q·Kᵀ and P·V, hands the turn to warpgroup 1 (an mbarrier), and does its
softmax while the tensor cores run warpgroup 1's MMAs, and the other way round. A third, one-warp
*producer* partition streams K and Vᵀ tiles through TMA into a ring of shared-memory slots that both
consumers read, so each tile is loaded once per 128 query rows.

Partitions (``gl.warp_specialize``), one CTA per SM:

* default partition, 4 warps, 240 registers: consumer 0, query rows [128·pid, 128·pid + 64);
* worker 0, 4 warps, 240 registers: consumer 1, rows [128·pid + 64, 128·pid + 128);
* worker 1, 1 warp, 24 registers: producer (TMA loads; waits for both consumers to free a slot).

Barriers (mbarriers in shared memory): ``ready[s]`` (TMA bytes landed in slot s), ``empty[s]`` (both
consumers finished reading slot s: count 2), ``turn[c]`` (consumer c may issue its next MMAs).

The numerics are exactly those of :mod:`.attention_gluon` (same helpers, same operation order), which
are those of the Triton kernel up to fp32 rounding order (see that module).
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, warpgroup_mma, \
    warpgroup_mma_wait

from .attention_gluon import LOG2_P_SCALE, _cta_barrier, _quant_q_rows, _softmax_tile, _tma_load, kv_descriptors_gluon
from .attention_ref import QuantKV

WS_STAGES = 3            # K/Vᵀ ring slots (3 × 32 KB at head_dim 128)
WS_BLOCK_M = 128         # query rows per CTA: 64 per consumer warpgroup
WS_CONSUMER_REGS = 240   # per thread, after setmaxnreg (2 × 128 × 240 + 128 × 24 ≤ 64 K registers)


@gluon.jit
def _producer(Q, KS, VS, VM, KM, O, LSE, k_desc, v_desc, q_smem, p_smem, k_smem, v_smem, ready, empty, turn,
              Lq, Lk, Lkp, H, sqb, sql, sqh, sob, sol, soh, qk_scale, ragged, return_lse):
    """One warp: key tile t → slot t % STAGES, once both consumers released the slot's previous tile."""
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    D: gl.constexpr = k_smem.type.shape[2]
    bh = gl.program_id(1)
    n_tiles = Lkp // BLOCK_N
    for t in range(n_tiles):
        slot = t % STAGES
        mbarrier.wait(empty.index(slot), ((t // STAGES) & 1) ^ 1)   # fresh barriers: the first wait passes
        bar = ready.index(slot)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [bh * Lkp + t * BLOCK_N, 0], bar, k_smem.index(slot))
        _tma_load(v_desc, [bh * D, t * BLOCK_N], bar, v_smem.index(slot))


@gluon.jit
def _take_turn(turn, c: gl.constexpr, e):
    """Wait until consumer ``c`` may issue MMAs for its e-th time (consumer 0 goes first)."""
    if c == 0:
        mbarrier.wait(turn.index(0), (e & 1) ^ 1)
    else:
        mbarrier.wait(turn.index(1), e & 1)


@gluon.jit
def _store_p(p_smem, p8):
    p_smem.store(p8)
    fence_async_shared()
    _cta_barrier()          # within this partition's warps


@gluon.jit
def _consumer_step(j, q_smem, p_smem, k_smem, v_smem, ready, empty, turn, KSH, acc, m_i, l_i, rowfac, Lk,
                   c: gl.constexpr, QK_INT8: gl.constexpr, MASKED: gl.constexpr, STAGES: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
    """Key tile j ≥ 1 for consumer c: issue Q·K_jᵀ and P_{j−1}·V_{j−1} in its turn, pass the turn on,
    softmax of tile j, then free slot j−1 once its P·V is done."""
    slot = j % STAGES
    prev = (j - 1) % STAGES
    n0 = j * BLOCK_N
    ks = gl.load(KSH + n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)))   # per-key K scales
    mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
    _take_turn(turn, c, j)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32 if QK_INT8 else gl.float32, s_layout)
    s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    acc = warpgroup_mma(p_smem, v_smem.index(prev).permute((1, 0)), acc, is_async=True)
    mbarrier.arrive(turn.index(1 - c), count=1)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
    m_i, l_i, p, alpha = _softmax_tile(s, ks, rowfac, m_i, l_i, n0, Lk, QK_INT8, MASKED, BLOCK_N, s_layout)
    p8 = p.to(gl.float8e4nv)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(prev), count=1)                   # this consumer is done with tile j − 1
    _store_p(p_smem, p8)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    return acc, m_i, l_i


@gluon.jit
def _consumer(c: gl.constexpr, Q, KS, VS, VM, KM, O, LSE, q_smem, p_smem, k_smem, v_smem, ready, empty, turn,
              Lq, Lk, Lkp, H, sqb, sql, sqh, sob, sol, soh, qk_scale, ragged, return_lse):
    # compile-time facts from the buffers' types (warp_specialize hands constexpr arguments over as values)
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    D: gl.constexpr = q_smem.type.shape[2]
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    QK_INT8: gl.constexpr = q_smem.type.element_ty == gl.int8
    QMAX_QK: gl.constexpr = 127.0 if QK_INT8 else 448.0
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 32])
    q_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1],
                                              order=[1, 0])
    q_mine = q_smem.index(c)
    p_mine = p_smem.index(c)
    row0 = pid_m * (2 * BLOCK_M) + c * BLOCK_M
    n_tiles = Lkp // BLOCK_N

    # this consumer's 64 query rows, quantized per token into its Q slot
    offs_m = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_layout))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, q_layout))
    q = gl.load(Q + b.to(gl.int64) * sqb + offs_m[:, None].to(gl.int64) * sql + h * sqh + offs_d[None, :],
                mask=(offs_m < Lq)[:, None], other=0.0).to(gl.float32)
    codes, amax = _quant_q_rows(q, QMAX_QK, QK_INT8)
    q_mine.store(codes)
    fence_async_shared()
    _cta_barrier()
    qk32 = (gl.zeros_like(amax) + qk_scale).to(gl.float32)
    rowfac = gl.convert_layout((amax / QMAX_QK) * qk32, gl.SliceLayout(1, s_layout))
    shift = gl.zeros_like(amax)
    if return_lse:
        shift = gl.sum(q * gl.load(KM + bh * D + offs_d)[None, :], axis=1) * (qk32 * 0.6931471805599453)

    # key tile 0
    KSH = KS + bh.to(gl.int64) * Lkp
    ks = gl.load(KSH + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    mbarrier.wait(ready.index(0), 0)
    _take_turn(turn, c, 0)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32 if QK_INT8 else gl.float32, s_layout)
    s = warpgroup_mma(q_mine, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.arrive(turn.index(1 - c), count=1)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    m_i, l_i, p, alpha = _softmax_tile(s, ks, rowfac, m_i, l_i, 0, Lk, QK_INT8, False, BLOCK_N, s_layout)
    _store_p(p_mine, p.to(gl.float8e4nv))
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)

    n_full = n_tiles - ragged                                   # the ragged last tile runs after the loop, masked
    for j in range(1, n_full):
        acc, m_i, l_i = _consumer_step(j, q_mine, p_mine, k_smem, v_smem, ready, empty, turn, KSH, acc, m_i, l_i,
                                       rowfac, Lk, c, QK_INT8, False, STAGES, BLOCK_M, BLOCK_N, s_layout, o_layout)
    if ragged:
        acc, m_i, l_i = _consumer_step(n_tiles - 1, q_mine, p_mine, k_smem, v_smem, ready, empty, turn, KSH, acc,
                                       m_i, l_i, rowfac, Lk, c, QK_INT8, True, STAGES, BLOCK_M, BLOCK_N, s_layout,
                                       o_layout)
    # the last tile's P·V (the (n_tiles)-th turn)
    last = (n_tiles - 1) % STAGES
    _take_turn(turn, c, n_tiles)
    acc = warpgroup_mma(p_mine, v_smem.index(last).permute((1, 0)), acc, is_async=True)
    mbarrier.arrive(turn.index(1 - c), count=1)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(last), count=1)

    offs_mo = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    offs_do = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    l_c = gl.convert_layout(gl.maximum(l_i, 1e-30), gl.SliceLayout(1, o_layout))
    vs = gl.load(VS + bh * D + offs_do)
    out = acc * vs[None, :] / l_c[:, None] + gl.load(VM + bh * D + offs_do)[None, :]
    gl.store(O + b.to(gl.int64) * sob + offs_mo[:, None].to(gl.int64) * sol + h * soh + offs_do[None, :],
             out.to(O.dtype.element_ty), mask=(offs_mo < Lq)[:, None])
    if return_lse:
        lse = (m_i + gl.log2(gl.maximum(l_i, 1e-30)) - LOG2_P_SCALE) * 0.6931471805599453 \
            + gl.convert_layout(shift, gl.SliceLayout(1, s_layout))
        offs_ml = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        gl.store(LSE + (b * Lq + offs_ml) * H + h, lse, mask=offs_ml < Lq)


@gluon.jit
def _consumer0(Q, KS, VS, VM, KM, O, LSE, k_desc, v_desc, q_smem, p_smem, k_smem, v_smem, ready, empty, turn,
               Lq, Lk, Lkp, H, sqb, sql, sqh, sob, sol, soh, qk_scale, ragged, return_lse):
    _consumer(0, Q, KS, VS, VM, KM, O, LSE, q_smem, p_smem, k_smem, v_smem, ready, empty, turn,
              Lq, Lk, Lkp, H, sqb, sql, sqh, sob, sol, soh, qk_scale, ragged, return_lse)


@gluon.jit
def _consumer1(Q, KS, VS, VM, KM, O, LSE, k_desc, v_desc, q_smem, p_smem, k_smem, v_smem, ready, empty, turn,
               Lq, Lk, Lkp, H, sqb, sql, sqh, sob, sol, soh, qk_scale, ragged, return_lse):
    _consumer(1, Q, KS, VS, VM, KM, O, LSE, q_smem, p_smem, k_smem, v_smem, ready, empty, turn,
              Lq, Lk, Lkp, H, sqb, sql, sqh, sob, sol, soh, qk_scale, ragged, return_lse)


@gluon.jit
def _attn_fwd_ws_kernel(Q, k_desc, KS, v_desc, VS, VM, KM, O, LSE,
                        Lq, Lk, Lkp, H, sqb, sql, sqh, sob, sol, soh, qk_scale,
                        RAGGED, RETURN_LSE, D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                        QK_INT8: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """Grid: (cdiv(Lq, 128), B·H); num_warps=4 (consumer 0) + 4 (consumer 1) + 1 (producer). Lk > BLOCK_N."""
    q_dtype: gl.constexpr = gl.int8 if QK_INT8 else gl.float8e4nv
    q_smem = gl.allocate_shared_memory(q_dtype, [2, 64, D], gl.NVMMASharedLayout.get_default_for([64, D], q_dtype))
    p_smem = gl.allocate_shared_memory(gl.float8e4nv, [2, 64, BLOCK_N],
                                       gl.NVMMASharedLayout.get_default_for([64, BLOCK_N], gl.float8e4nv))
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, D, BLOCK_N], v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)                    # both consumers release a slot
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    args = (Q, KS, VS, VM, KM, O, LSE, k_desc, v_desc, q_smem, p_smem, k_smem, v_smem, ready, empty, turn,
            Lq, Lk, Lkp, H, sqb, sql, sqh, sob, sol, soh, qk_scale, RAGGED, RETURN_LSE)
    gl.warp_specialize([(_consumer0, args), (_consumer1, args), (_producer, args)], [4, 1], [CONSUMER_REGS, 24])


def launch_ws(q: torch.Tensor, kv: QuantKV, scale: float, qk_format: str, out: torch.Tensor,
              lse: torch.Tensor | None, stages: int = WS_STAGES) -> None:
    """Run the warp-specialized kernel: ``out`` (B, Lq, H, D) and, if given, ``lse`` (B, Lq, H) are written.
    ``scale`` includes log2 e; K/V from ``attention_triton.quantize_kv`` with more than one key tile."""
    B, Lq, H, D = q.shape
    k_desc, v_desc = kv_descriptors_gluon(kv, kv.block_n)
    grid = (triton.cdiv(Lq, WS_BLOCK_M), B * H)
    _attn_fwd_ws_kernel[grid](
        q, k_desc, kv.k_scale, v_desc, kv.v_scale, kv.v_mean, kv.k_mean, out, lse if lse is not None else out,
        Lq, kv.lk, kv.k8.shape[2], H, q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1),
        out.stride(2), scale, int(kv.lk % kv.block_n != 0), int(lse is not None), D=D, BLOCK_N=kv.block_n,
        STAGES=stages, QK_INT8=qk_format == "int8", CONSUMER_REGS=WS_CONSUMER_REGS, num_warps=4, maxnreg=168)


__all__ = ["launch_ws", "WS_STAGES", "WS_BLOCK_M"]
