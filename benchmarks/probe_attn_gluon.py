"""Probe: variants of the Gluon attention kernel's key loop, timed beside cuDNN and the production kernels.

    PYTHONPATH=src python3 benchmarks/probe_attn_gluon.py --out probe.json [--variants base,w8,lmma,lazy1,...]

Why this exists: Nsight Compute on the H100 (session 7, ``benchmarks/attn_profile_target.py``) shows the
8-bit attention kernels issuing an instruction only 45 % of cycles, with no pipe saturated (MUFU 34–37 %,
tensor 32–35 %): they are latency-bound — two warps per scheduler, each running long dependent chains
(row max, row sum, exponentials) between its MMAs. This probe copies the production Gluon kernel's loop
(``dvdquant.kernels.attention_gluon``, one warpgroup, async wgmma, K scales prefetched) with constexpr
switches that attack those chains, and reports time, × cuDNN and error against cuDNN:

* ``w8``: 8 warps, 128 query rows per program (two warpgroups share each K/V tile);
* ``lmma``: the row sum l on the tensor cores — a 16-column wgmma of P against ones, issued with P·V —
  instead of 64 dependent FADDs per thread and tile (l then sums the e4m3 P, the same values P·V sums);
* ``lazy<τ>``: FlashAttention-4's lazy rescaling: the running max moves only when some row of the tile
  exceeds it by more than τ (log2 units); otherwise α = 1 and the accumulator's rescale is skipped
  (a branch on a CTA-wide flag). P is then e4m3(448·2^−τ·2^(s−m)), ≤ 448 by construction.
* ``r<N>``: launch with ``maxnreg=N`` (e.g. 168 for three programs per SM);
* ``n<keys>``: key tile size (64 halves the score tile's registers: three programs per SM fit 168).

Variants that change the numerics (``lmma``, ``lazy``) are not the production numerics; the error
columns show what they cost. Nothing here is asserted; results go to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, warpgroup_mma, \
    warpgroup_mma_wait

from bench_attention import metrics, timed   # same directory: run as benchmarks/probe_attn_gluon.py
from dvdquant.kernels.attention_gluon import (LOG2_P_SCALE, _cta_barrier, _issue_kv_load, _quant_q_rows,
                                              attend_gluon, kv_descriptors_gluon)
from dvdquant.kernels.attention_ref import LOG2E
from dvdquant.kernels.attention_triton import quant_attention, quantize_kv

log = logging.getLogger("probe_attn_gluon")


@gluon.jit
def _softmax(s, ks, rowfac, m_i, l_i, n0, Lk, MASKED: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
             L_MMA: gl.constexpr, TAU: gl.constexpr):
    """Returns (m, l, p', α, rescale?): exact online softmax when TAU == 0, else lazy (see module doc)."""
    sk = s.to(gl.float32) * ks[None, :]
    if MASKED:
        cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        sk = gl.where((cols < Lk)[None, :], sk, float("-inf"))
    m_tile = gl.max(sk, axis=1) * rowfac
    if TAU > 0:
        grow = gl.max((m_tile > m_i + TAU).to(gl.int32), axis=0)       # CTA-wide: does any row outgrow τ?
        if grow > 0:
            m_new = gl.maximum(m_i, m_tile)
        else:
            m_new = m_i
        p = gl.exp2(sk * rowfac[:, None] - (m_new - (LOG2_P_SCALE - TAU))[:, None])
    else:
        grow = 1
        m_new = gl.maximum(m_i, m_tile)
        p = gl.exp2(sk * rowfac[:, None] - (m_new - LOG2_P_SCALE)[:, None])
    alpha = gl.exp2(m_i - m_new)
    if L_MMA:
        l_i = l_i * alpha
    else:
        l_i = l_i * alpha + gl.sum(p, axis=1)
    return m_new, l_i, p, alpha, grow


@gluon.jit
def _step(j, q_smem, k_smem, v_smem, p_smem, ones_smem, bars, k_desc, v_desc, KSH, acc, l_acc, m_i, l_i, rowfac, ks,
          n_tiles, Lk, k_row0, v_row0, MASKED: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr,
          BLOCK_N: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr, l_layout: gl.constexpr,
          L_MMA: gl.constexpr, TAU: gl.constexpr):
    slot = j % STAGES
    prev = (j - 1) % STAGES
    n0 = j * BLOCK_N
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    ks_next = gl.load(KSH + n0 + BLOCK_N + cols, mask=n0 + BLOCK_N + cols < n_tiles * BLOCK_N, other=1.0)
    mbarrier.wait(bars.index(slot), (j // STAGES) & 1)
    s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)),
                      gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout), use_acc=False, is_async=True)
    acc = warpgroup_mma(p_smem, v_smem.index(prev).permute((1, 0)), acc, is_async=True)
    if L_MMA:
        l_acc = warpgroup_mma(p_smem, ones_smem.permute((1, 0)), l_acc, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=2 if L_MMA else 1, deps=(s,))
    m_i, l_i, p, alpha, grow = _softmax(s, ks, rowfac, m_i, l_i, n0, Lk, MASKED, BLOCK_N, s_layout, L_MMA, TAU)
    p8 = p.to(gl.float8e4nv)
    acc, l_acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, l_acc))
    p_smem.store(p8)
    fence_async_shared()
    _cta_barrier()
    if grow > 0:
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        if L_MMA:
            l_acc = l_acc * gl.convert_layout(alpha, gl.SliceLayout(1, l_layout))[:, None]
    _issue_kv_load(k_desc, v_desc, k_smem, v_smem, bars, j + STAGES - 1, n_tiles, k_row0, v_row0, STAGES, BLOCK_N)
    return acc, l_acc, m_i, l_i, ks_next


@gluon.jit
def _probe_kernel(Q, k_desc, KS, v_desc, VS, VM, O, Lq, Lk, Lkp, H, sqb, sql, sqh, sob, sol, soh, qk_scale,
                  D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, RAGGED: gl.constexpr,
                  L_MMA: gl.constexpr, TAU: gl.constexpr):
    """INT8 Q·Kᵀ, no mask, no lse; BLOCK_M = 16 · num_warps."""
    NW: gl.constexpr = gl.num_warps()
    BLOCK_M: gl.constexpr = 16 * NW
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, D, 32])
    l_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, 16, 32])
    q_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[NW, 1],
                                              order=[1, 0])
    q_smem = gl.allocate_shared_memory(gl.int8, [BLOCK_M, D], gl.NVMMASharedLayout.get_default_for([BLOCK_M, D],
                                                                                                    gl.int8))
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, D, BLOCK_N], v_desc.layout)
    p_smem = gl.allocate_shared_memory(gl.float8e4nv, [BLOCK_M, BLOCK_N],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], gl.float8e4nv))
    ones_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[2, 16],
                                                 warps_per_cta=[NW, 1], order=[1, 0])
    ones_smem = gl.allocate_shared_memory(gl.float8e4nv, [16, BLOCK_N],
                                          gl.NVMMASharedLayout.get_default_for([16, BLOCK_N], gl.float8e4nv),
                                          gl.full([16, BLOCK_N], 1.0, gl.float32, ones_layout).to(gl.float8e4nv))
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    n_tiles = Lkp // BLOCK_N
    k_row0 = bh * Lkp
    v_row0 = bh * D
    for i in gl.static_range(STAGES):
        _issue_kv_load(k_desc, v_desc, k_smem, v_smem, bars, i, n_tiles, k_row0, v_row0, STAGES, BLOCK_N)
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_layout))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, q_layout))
    q = gl.load(Q + b.to(gl.int64) * sqb + offs_m[:, None].to(gl.int64) * sql + h * sqh + offs_d[None, :],
                mask=(offs_m < Lq)[:, None], other=0.0).to(gl.float32)
    codes, amax = _quant_q_rows(q, 127.0, True)
    q_smem.store(codes)
    fence_async_shared()
    _cta_barrier()
    qk32 = (gl.zeros_like(amax) + qk_scale).to(gl.float32)
    rowfac = gl.convert_layout((amax / 127.0) * qk32, gl.SliceLayout(1, s_layout))
    KSH = KS + bh.to(gl.int64) * Lkp
    ks = gl.load(KSH + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    mbarrier.wait(bars.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout),
                      use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    m_i, l_i, p, alpha, grow = _softmax(s, ks, rowfac, m_i, l_i, 0, Lk, False, BLOCK_N, s_layout, L_MMA, TAU)
    p_smem.store(p.to(gl.float8e4nv))
    fence_async_shared()
    _cta_barrier()
    ks = gl.load(KSH + BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)))
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    l_acc = gl.zeros([BLOCK_M, 16], gl.float32, l_layout)
    n_full = n_tiles - 1 if RAGGED else n_tiles
    for j in range(1, n_full):
        acc, l_acc, m_i, l_i, ks = _step(j, q_smem, k_smem, v_smem, p_smem, ones_smem, bars, k_desc, v_desc, KSH,
                                         acc, l_acc, m_i, l_i, rowfac, ks, n_tiles, Lk, k_row0, v_row0, False,
                                         STAGES, BLOCK_M, BLOCK_N, s_layout, o_layout, l_layout, L_MMA, TAU)
    if RAGGED:
        acc, l_acc, m_i, l_i, ks = _step(n_tiles - 1, q_smem, k_smem, v_smem, p_smem, ones_smem, bars, k_desc,
                                         v_desc, KSH, acc, l_acc, m_i, l_i, rowfac, ks, n_tiles, Lk, k_row0, v_row0,
                                         True, STAGES, BLOCK_M, BLOCK_N, s_layout, o_layout, l_layout, L_MMA, TAU)
    last = (n_tiles - 1) % STAGES
    acc = warpgroup_mma(p_smem, v_smem.index(last).permute((1, 0)), acc, is_async=True)
    if L_MMA:
        l_acc = warpgroup_mma(p_smem, ones_smem.permute((1, 0)), l_acc, is_async=True)
    acc, l_acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, l_acc))
    if L_MMA:
        l_o = gl.convert_layout(gl.max(l_acc, axis=1), gl.SliceLayout(1, o_layout))
    else:
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    offs_mo = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    offs_do = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    out = acc * gl.load(VS + bh * D + offs_do)[None, :] / gl.maximum(l_o, 1e-30)[:, None] \
        + gl.load(VM + bh * D + offs_do)[None, :]
    gl.store(O + b.to(gl.int64) * sob + offs_mo[:, None].to(gl.int64) * sol + h * soh + offs_do[None, :],
             out.to(O.dtype.element_ty), mask=(offs_mo < Lq)[:, None])


def parse(var: str) -> dict:
    """``base``, or ``+``-joined switches: ``w8``, ``lmma``, ``lazy<τ>``, ``s<stages>``, ``r<maxnreg>``,
    ``n<keys>`` (key tile; K/V re-quantized with it)."""
    cfg = dict(num_warps=4, l_mma=False, tau=0.0, stages=3, maxnreg=None, block_n=None)
    for part in ([] if var == "base" else var.split("+")):
        if part == "w8":
            cfg["num_warps"] = 8
        elif part == "lmma":
            cfg["l_mma"] = True
        elif (m := re.fullmatch(r"lazy([\d.]+)", part)):
            cfg["tau"] = float(m.group(1))
        elif (m := re.fullmatch(r"s(\d)", part)):
            cfg["stages"] = int(m.group(1))
        elif (m := re.fullmatch(r"n(\d+)", part)):
            cfg["block_n"] = int(m.group(1))
        elif (m := re.fullmatch(r"r(\d+)", part)):
            cfg["maxnreg"] = int(m.group(1))
        else:
            raise ValueError(f"unknown switch {part!r} in {var!r}")
    return cfg


def launch(q, kv, cfg: dict):
    B, Lq, H, D = q.shape
    out = torch.empty_like(q)
    k_desc, v_desc = kv_descriptors_gluon(kv, kv.block_n)
    extra = {} if cfg["maxnreg"] is None else dict(maxnreg=cfg["maxnreg"])
    _probe_kernel[(triton.cdiv(Lq, 16 * cfg["num_warps"]), B * H)](
        q, k_desc, kv.k_scale, v_desc, kv.v_scale, kv.v_mean, out, Lq, kv.lk, kv.k8.shape[2], H,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2), LOG2E / math.sqrt(D),
        D=D, BLOCK_N=kv.block_n, STAGES=cfg["stages"], RAGGED=kv.lk % kv.block_n != 0, L_MMA=cfg["l_mma"],
        TAU=cfg["tau"], num_warps=cfg["num_warps"], **extra)
    return out


def compiled_stats(fn) -> dict:
    """Registers and spills of the kernels a JIT function compiled so far (Triton's device cache)."""
    out = {}
    try:
        for cache in fn.device_caches.values():
            for key, ck in cache[0].items():
                out[str(len(out))] = dict(regs=ck.n_regs, spills=ck.n_spills, shared=ck.metadata.shared)
    except (AttributeError, KeyError, IndexError, TypeError) as e:
        out["error"] = str(e)[:100]
    return out


def run_shape(B, H, L, D, variants, reps) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, L, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k = (torch.randn(B, L, H, D, device="cuda", generator=g) + torch.randn(1, 1, H, D, device="cuda", generator=g) * 3
         ).to(torch.bfloat16)
    v = (torch.randn(B, L, H, D, device="cuda", generator=g) + torch.randn(1, 1, H, D, device="cuda", generator=g)
         ).to(torch.bfloat16)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
        t_cudnn = timed(sdpa, reps) * 1e3
        ref = sdpa().transpose(1, 2)
    kv = quantize_kv(k, v, "int8", 128 if D == 128 else 64)
    c = LOG2E / math.sqrt(D)
    row = dict(B=B, H=H, L=L, D=D, cudnn_ms=round(t_cudnn, 3))
    prod = {"triton": lambda: quant_attention(q, k, v, impl="triton"),
            "gluon": lambda: attend_gluon(q, kv, c, "int8", stages=3 if D == 128 else 2)[0]}
    for name, fn in prod.items():
        t = timed(fn, reps) * 1e3
        row[name] = dict(ms=round(t, 3), x_cudnn=round(t_cudnn / t, 3), err=metrics(fn(), ref))
    kvs = {kv.block_n: kv}
    for var in variants:
        cfg = parse(var)
        try:
            bn = cfg["block_n"] or kv.block_n
            if bn not in kvs:
                kvs[bn] = quantize_kv(k, v, "int8", bn)
            kvv = kvs[bn]
            fn = lambda: launch(q, kvv, cfg)  # noqa: E731
            o = fn()
            t = timed(fn, reps) * 1e3
            row[var] = dict(ms=round(t, 3), x_cudnn=round(t_cudnn / t, 3), err=metrics(o, ref))
            stats = compiled_stats(_probe_kernel)
            row[var]["compiled"] = stats[max(stats)] if stats and "error" not in stats else stats
        except Exception as e:  # noqa: BLE001 — a variant that does not compile or launch: record, go on
            row[var] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
        log.info("%s %s", var, row[var])
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="probe_attn_gluon.json")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", default="base,w8,lmma,lazy1,lazy3,lmma+lazy3,w8+lmma+lazy3")
    ap.add_argument("--shapes", default="1x40x32760x128,1x24x67320x128,1x48x17776x64")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    rows = [run_shape(*s, args.variants.split(","), args.reps) for s in shapes]
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(90)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       ptxas=str(ptxas), rows=rows), f, indent=1)
    for r in rows:
        print(r["H"], r["L"], r["D"], "cudnn", r["cudnn_ms"],
              " ".join(f"{k}={v.get('x_cudnn', 'ERR')}/{v.get('err', ['', ''])[1]}"
                       f"/{v.get('compiled', {}).get('regs', '')}r{v.get('compiled', {}).get('spills', '')}s"
                       for k, v in r.items() if isinstance(v, dict)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
