"""Probe: which changes to the 8-bit attention kernel's inner loop make it faster on Hopper?

    PYTHONPATH=src python3 benchmarks/probe_attn_variants.py --out $OUT [--reps 5]

The production kernel (``kernels/attention_triton.py``) runs at about 1.0× cuDNN bf16 on an H100
(docs/results/attention.md). Per score it issues, besides the two MMAs: an int32 → fp32 convert
(I2F: quarter rate on Hopper, like the exponential), the per-key scale multiply, the row max, the
exponent's FMA, exp2, the row sum, ×448 and the e4m3 convert, plus one FMA per output element for
the two-level P·V accumulation, which also keeps a second (BLOCK_M, D) fp32 accumulator live. This
probe is a copy of the unmasked full-tile loop with constexpr switches for each candidate change,
timed side by side with the production kernel and cuDNN in one process:

* ``SINGLE_ACC`` — P·V accumulates into the running accumulator (``tl.dot(p, v, acc·α)``): one
  accumulator fewer (registers, occupancy), but FP8 wgmma accumulation keeps fewer than 32 bits,
  so long sequences may lose accuracy (measured here against fp32 SDPA);
* ``FOLD448`` — ×448 folded into the exponent's offset (2^(s − m + log2 448)); l in the same units;
* ``MAGIC`` — int32 → fp32 by adding 0x4B400000 to the bits and one FMA with a per-key constant
  −1.5·2²³·sk_j (exact when sk_j has ≤ 21 significant bits, as the probe rounds it): an integer
  add instead of the quarter-rate convert;
* ``PREFETCH`` — the next tile's Q·Kᵀ is issued before this tile's softmax (software pipelining
  by hand, the intra-warpgroup overlap of FlashAttention-3), if Triton keeps the wgmma in flight;
* launch configs (block_m, warps, stages), with register counts and spills of each compile.

Outputs: ``attn_variants.json`` (times, × cuDNN, cos / rel. L2 against fp32 SDPA, bit-equality
with the probe's baseline variant). Nothing is asserted; the kernel is only changed once a variant
measures faster and stays within the accuracy bound.

Found on an H100 (session 6, docs/results/attention.md): every 128-row config sat at 255 registers
with spills; 64-row tiles on 4 warps (two programs per SM) were 1.11–1.17× faster, and with
``SINGLE_ACC`` + ``FOLD448`` 1.16–1.20× (adopted, same error against fp32 SDPA); ``MAGIC`` and
``PREFETCH`` spilled and lost; ``maxnreg`` caps for a third program per SM spilled and lost.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import triton
import triton.language as tl

from bench_attention import cudnn_seconds, inputs, kernel_only, metrics, timed
from dvdquant.kernels.attention_ref import LOG2E, block_n_for
from dvdquant.kernels.attention_triton import LAUNCH_BY_HEAD_DIM, LOG2_P_SCALE, _quant_rows, quantize_kv


@triton.jit
def _softmax_pv(t, n0, rowfac, m_i, l_i, acc, ks_ptr, kc_ptr, v_ptr, BLOCK_N: tl.constexpr,
                SINGLE_ACC: tl.constexpr, FOLD448: tl.constexpr, MAGIC: tl.constexpr):
    ks = tl.load(ks_ptr + n0 + tl.arange(0, BLOCK_N))
    if MAGIC:
        kc = tl.load(kc_ptr + n0 + tl.arange(0, BLOCK_N))
        tf = (t + 0x4B400000).to(tl.float32, bitcast=True)      # 1.5·2^23 + t, exact for |t| < 2^22
        sk = tl.fma(tf, ks[None, :], kc[None, :])                # (1.5·2^23 + t)·sk − 1.5·2^23·sk, one rounding
    else:
        sk = t.to(tl.float32) * ks[None, :]
    m_new = tl.maximum(m_i, tl.max(sk, axis=1) * rowfac)
    if FOLD448:
        p = tl.math.exp2(sk * rowfac[:, None] - (m_new - LOG2_P_SCALE)[:, None])   # 448·p
    else:
        p = tl.math.exp2(sk * rowfac[:, None] - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if FOLD448:
        p8 = p.to(tl.float8e4nv)
    else:
        p8 = (p * 448.0).to(tl.float8e4nv)
    v = tl.load(v_ptr + n0)
    if SINGLE_ACC:
        acc = tl.dot(p8, v, acc * alpha[:, None])
    else:
        acc = acc * alpha[:, None] + tl.dot(p8, v)
    return m_new, l_i, acc


@triton.jit
def _probe_kernel(Q, K8, KS, KC, V8T, VS, VM, O, Lq, Lkp, H, sqb, sql, sqh, qk_scale,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_ACC: tl.constexpr = False,
                  FOLD448: tl.constexpr = False, MAGIC: tl.constexpr = False, PREFETCH: tl.constexpr = False):
    """INT8 Q·Kᵀ, no mask, Lk a multiple of BLOCK_N; Q/O (B, L, H, D), codes as quantize_kv lays them out."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = (offs_m < Lq)[:, None]
    q = tl.load(Q + b.to(tl.int64) * sqb + offs_m[:, None].to(tl.int64) * sql + h * sqh + offs_d[None, :],
                mask=row_ok, other=0.0).to(tl.float32)
    q8, amax = _quant_rows(q, 127.0, True, False)
    rowfac = (amax / 127.0) * qk_scale
    k_ptr = K8 + bh.to(tl.int64) * Lkp * D + offs_d[:, None] + offs_n[None, :] * D      # Kᵀ tile (D, BLOCK_N)
    v_ptr = V8T + bh.to(tl.int64) * D * Lkp + offs_n[:, None] + offs_d[None, :] * Lkp   # V tile (BLOCK_N, D)
    ks_ptr = KS + bh.to(tl.int64) * Lkp
    kc_ptr = KC + bh.to(tl.int64) * Lkp
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if PREFETCH:
        t = tl.dot(q8, tl.load(k_ptr), out_dtype=tl.int32)
        for n0 in range(0, Lkp - BLOCK_N, BLOCK_N):
            t_next = tl.dot(q8, tl.load(k_ptr + (n0 + BLOCK_N) * D), out_dtype=tl.int32)
            m_i, l_i, acc = _softmax_pv(t, n0, rowfac, m_i, l_i, acc, ks_ptr, kc_ptr, v_ptr, BLOCK_N,
                                        SINGLE_ACC, FOLD448, MAGIC)
            t = t_next
        m_i, l_i, acc = _softmax_pv(t, Lkp - BLOCK_N, rowfac, m_i, l_i, acc, ks_ptr, kc_ptr, v_ptr, BLOCK_N,
                                    SINGLE_ACC, FOLD448, MAGIC)
    else:
        for n0 in range(0, Lkp, BLOCK_N):
            t = tl.dot(q8, tl.load(k_ptr + n0 * D), out_dtype=tl.int32)
            m_i, l_i, acc = _softmax_pv(t, n0, rowfac, m_i, l_i, acc, ks_ptr, kc_ptr, v_ptr, BLOCK_N,
                                        SINGLE_ACC, FOLD448, MAGIC)
    vs = tl.load(VS + bh * D + offs_d)
    if not FOLD448:
        vs = vs * (1.0 / 448.0)
    out = acc * vs[None, :] / l_i[:, None] + tl.load(VM + bh * D + offs_d)[None, :]
    tl.store(O + b.to(tl.int64) * sqb + offs_m[:, None].to(tl.int64) * sql + h * sqh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok)


def round_scales(ks: torch.Tensor):
    """sk rounded to 21 significant bits (so that 1.5·2^23·sk is exact in fp32) and −1.5·2^23·sk."""
    bits = ks.view(torch.int32)
    r = ((bits + (1 << 2)) & ~((1 << 3) - 1)).view(torch.float32)   # drop 3 of 24 mantissa bits (round half up)
    return r, -(r * 12582912.0)


def probe_call(q, kv, ks, kc, flags, bm, bn, warps, stages, maxnreg=None):
    B, Lq, H, D = q.shape
    out = torch.empty_like(q)
    grid = (triton.cdiv(Lq, bm), B * H)
    info = {}

    def run():
        k = _probe_kernel[grid](q, kv.k8, ks, kc, kv.v8t, kv.v_scale, kv.v_mean, out, Lq, kv.k8.shape[2], H,
                                q.stride(0), q.stride(1), q.stride(2), LOG2E / math.sqrt(D), D=D, BLOCK_M=bm,
                                BLOCK_N=bn, num_warps=warps, num_stages=stages,
                                **({"maxnreg": maxnreg} if maxnreg else {}), **flags)
        if not info and k is not None:
            info.update(regs=getattr(k, "n_regs", None), spills=getattr(k, "n_spills", None))
        return out
    return run, info


FLAGS = dict(s="SINGLE_ACC", f="FOLD448", m="MAGIC", p="PREFETCH")


def variant_flags(name: str) -> dict:
    """'base' → {}; 's+f' → SINGLE_ACC and FOLD448 (letters: s single_acc, f fold448, m magic, p prefetch)."""
    return {} if name == "base" else {FLAGS[c]: True for c in name.split("+")}


def parse_launch(text: str):
    """'BMxBNxWARPSxSTAGES[rMAXNREG]', e.g. 64x128x4x3 or 64x64x4x2r168."""
    cfg, _, reg = text.partition("r")
    bm, bn, warps, stages = (int(x) for x in cfg.split("x"))
    return bm, bn, warps, stages, int(reg) if reg else None


# session 6, call 1 (H100): every flag at five launch configs (these defaults); call 2: occupancy
# (block_m 64, block_n 64, maxnreg) for base / s / f / s+f — the command is in docs/results/attention.md
DEFAULT_VARIANTS = "base,s,f,m,p,s+f+m,f+m,s+f+m+p,f+m+p"
DEFAULT_LAUNCHES = "128x128x8x3,128x128x8x4,64x128x4x3,64x128x4x4,128x128x8x2"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shapes", default="1x40x32768x128,1x24x67328x128", help="BxHxLxD, L a multiple of 128")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--launches", default=DEFAULT_LAUNCHES, help="per shape: ';'-separated lists, or one for all")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a GPU", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for si, shape in enumerate(args.shapes.split(",")):
        B, H, L, D = (int(x) for x in shape.split("x"))
        q, k, v = inputs(B, H, L, D)
        launch_lists = args.launches.split(";")
        launches = [parse_launch(x) for x in launch_lists[min(si, len(launch_lists) - 1)].split(",")]
        prod_cfg = LAUNCH_BY_HEAD_DIM[D]                           # the production kernel's launch
        kvs = {bn: quantize_kv(k, v, "int8", bn) for bn in sorted({la[1] for la in launches} | {block_n_for(D)})}
        kv = kvs[block_n_for(D)]
        with torch.no_grad():       # fp32 truth (memory-efficient SDPA, no L² buffer)
            ref = torch.nn.functional.scaled_dot_product_attention(
                *(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        tc = cudnn_seconds(q, k, v, args.reps)
        prod = kernel_only(q, kv, "int8", prod_cfg["block_m"], block_n_for(D), prod_cfg["num_warps"],
                           prod_cfg["num_stages"])
        tp = timed(prod, args.reps)
        head = dict(shape=shape, cudnn_ms=round(tc * 1e3, 3), prod_ms=round(tp * 1e3, 3),
                    prod_x_cudnn=round(tc / tp, 3), prod_acc=metrics(prod(), ref))
        print(json.dumps(head), flush=True)
        rows.append(head)
        base_out = None
        for name in args.variants.split(","):
            flags = variant_flags(name)
            for bm, bn, warps, stages, maxnreg in launches:
                key = dict(shape=shape, variant=name, bm=bm, bn=bn, warps=warps, stages=stages, maxnreg=maxnreg)
                try:
                    kvn = kvs[bn]
                    fn, info = probe_call(q, kvn, *round_scales(kvn.k_scale), flags, bm, bn, warps, stages, maxnreg)
                    o = fn().clone()
                    t = timed(fn, args.reps)
                except Exception as e:  # noqa: BLE001 - a variant that fails to compile is a result too
                    row = dict(key, error=repr(e)[:300])
                else:
                    if base_out is None and name == "base" and bn == block_n_for(D):
                        base_out = o
                    row = dict(key, ms=round(t * 1e3, 3),
                               x_cudnn=round(tc / t, 3), x_prod=round(tp / t, 3), acc_vs_fp32=metrics(o, ref),
                               same_as_base=bool(base_out is not None and torch.equal(o, base_out)), **info)
                print(json.dumps(row), flush=True)
                rows.append(row)
        q = k = v = kv = kvs = ref = None
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "attn_variants.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
