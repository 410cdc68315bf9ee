"""8-bit attention kernel vs cuDNN and flash bf16 SDPA at video-DiT shapes, side by side in one process.

    PYTHONPATH=src python3 benchmarks/bench_attention.py --out attention_bench.json [--quick]

1. A launch-configuration sweep of the kernel (block sizes, warps, stages; INT8 and FP8 Q·Kᵀ)
   at L = 32768, 24 heads × 128.
   ``--tma``: pointer vs TMA K/V loads; ``--gluon``: the Gluon kernel (``attention_gluon``) vs the
   Triton kernel vs cuDNN.
2. For every shape: cuDNN SDPA, flash SDPA (both bf16, on (B, H, L, D)-contiguous inputs, their
   best case), the kernel alone (K/V already quantized), the K/V quantize pass, and the whole
   call from bf16 Q/K/V in the model layout (B, L, H, D); TFLOP/s = 4·B·H·Lq·Lk·D / time; accuracy
   (cos, rel. L2) of the kernel against cuDNN on DiT-like random inputs.
Timing: CUDA events, warm-up, the median of ``--reps`` runs (METHOD.md). Benchmarks write files;
nothing here is asserted.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dvdquant.kernels.attention_triton import (_attn_fwd_kernel, default_use_tma, kv_descriptors, quant_attention,
                                               quantize_kv)
from dvdquant.kernels.attention_ref import LOG2E, QMAX
from dvdquant.kernels.env import interpreting

log = logging.getLogger("bench_attention")
SHAPES = [  # (B, H, L, D): Wan 2.1 14B 480p (32,760 tokens, 40 heads), 24-head L = 32k..68k, head_dim 64
    (1, 24, 32768, 128), (1, 40, 32760, 128), (1, 24, 49152, 128), (1, 24, 67320, 128), (1, 40, 67320, 128),
    (1, 48, 32768, 64),
]


def timed(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``reps`` runs, each between two CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times)


def metrics(o, r):
    o, r = o.float().flatten(), r.float().flatten()
    return round(float(torch.nn.functional.cosine_similarity(o, r, dim=0)), 6), round(float((o - r).norm() / r.norm()), 5)


def inputs(B, H, L, D, seed=0):
    """DiT-like: K with a shared per-channel offset, V with a channel mean; model layout (B, L, H, D)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, L, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(B, L, H, D, device="cuda", generator=g, dtype=torch.bfloat16) + \
        (torch.randn(1, 1, H, D, device="cuda", generator=g) * 3).to(torch.bfloat16)
    v = torch.randn(B, L, H, D, device="cuda", generator=g, dtype=torch.bfloat16) + \
        torch.randn(1, 1, H, D, device="cuda", generator=g).to(torch.bfloat16)
    return q, k, v


def kernel_only(q, kv, fmt, bm, bn, warps, stages, use_tma=False):
    """The attention kernel on already-quantized K/V (what a fused QKV-producing kernel would leave)."""
    B, Lq, H, D = q.shape
    out = torch.empty_like(q)
    lkp = kv.k8.shape[2]
    c = LOG2E / math.sqrt(D)
    grid = (triton_cdiv(Lq, bm), B * H)
    k_src, v_src = kv_descriptors(kv, bn) if use_tma else (kv.k8, kv.v8t)

    def run():
        _attn_fwd_kernel[grid](q, k_src, kv.k_scale, v_src, kv.v_scale, kv.v_offset, kv.k_mean, kv.v_scale, kv.v_scale,
                               out, out, Lq, kv.lk, lkp, H, q.stride(0), q.stride(1), q.stride(2), out.stride(0),
                               out.stride(1), out.stride(2), 0, 0, 0, 0, c, D=D, BLOCK_M=bm, BLOCK_N=bn,
                               QK_INT8=fmt == "int8", QMAX_QK=QMAX[fmt], HAS_BIAS=False, RAGGED=kv.lk % bn != 0,
                               RETURN_LSE=False, EXACT_FP8=interpreting(), USE_TMA=use_tma, num_warps=warps,
                               num_stages=stages)
        return out
    return run


def cudnn_seconds(q, k, v, reps: int) -> float:
    """Median seconds of cuDNN bf16 SDPA on (B, H, L, D)-contiguous copies of model-layout q, k, v."""
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return timed(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt), reps)


def tma_compare(shapes, reps: int, stages=(3, 4)) -> list:
    """cuDNN vs the kernel with pointer loads vs the kernel with TMA (tensor-descriptor) K/V loads, INT8
    Q·Kᵀ, the head_dim's default tiles and warps, at each of ``stages``; outputs compared bit for bit."""
    from dvdquant.kernels.attention_ref import block_n_for
    from dvdquant.kernels.attention_triton import LAUNCH_BY_HEAD_DIM
    rows = []
    for B, H, L, D in shapes:
        q, k, v = inputs(B, H, L, D)
        flops = 4 * B * H * L * L * D
        tc = cudnn_seconds(q, k, v, reps)
        cfg, bn = LAUNCH_BY_HEAD_DIM[D], block_n_for(D)
        kv = quantize_kv(k, v, "int8", bn)
        row = dict(B=B, H=H, L=L, D=D, cudnn_ms=round(tc * 1e3, 3), cudnn_tflops=round(flops / tc / 1e12, 1))
        for st in stages:
            ptr, tma = (kernel_only(q, kv, "int8", cfg["block_m"], bn, cfg["num_warps"], st, use_tma=u)
                        for u in (False, True))
            same = torch.equal(ptr().clone(), tma())
            for name, fn in (("pointer", ptr), ("tma", tma)):
                t = timed(fn, reps)
                row[f"{name}_s{st}_ms"] = round(t * 1e3, 3)
                row[f"{name}_s{st}_x_cudnn"] = round(tc / t, 3)
            row[f"same_output_s{st}"] = same
        log.info("tma %s", json.dumps(row))
        rows.append(row)
        q = k = v = kv = None
        torch.cuda.empty_cache()
    return rows


def _gluon_variant(var: str) -> dict:
    """``wg3`` → the Gluon kernel with a 3-slot K/V ring (``attention_gluon``)."""
    m = re.fullmatch(r"wg(\d)", var)
    if m is None:
        raise ValueError(f"bad Gluon variant {var!r} (wg<stages>)")
    return dict(stages=int(m.group(1)))


def gluon_compare(shapes, reps: int, variants=("wg2",)) -> list:
    """cuDNN vs the Triton kernel (its defaults: tiles, TMA where default) vs the Gluon kernel
    variants ``wg<stages>`` (``attention_gluon`` with that K/V ring depth), kernel alone on the same
    quantized K/V, INT8 Q·Kᵀ;
    the whole ``quant_attention`` call per impl; Gluon's output against the Triton kernel's and cuDNN's."""
    from dvdquant.kernels.attention_gluon import attend_gluon
    from dvdquant.kernels.attention_ref import block_n_for
    from dvdquant.kernels.attention_triton import LAUNCH_BY_HEAD_DIM
    rows = []
    for B, H, L, D in shapes:
        q, k, v = inputs(B, H, L, D)
        flops = 4 * B * H * L * L * D
        tc = cudnn_seconds(q, k, v, reps)
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
        qt = kt = vt = None
        cfg, bn = LAUNCH_BY_HEAD_DIM[D], block_n_for(D)
        kv = quantize_kv(k, v, "int8", bn)
        c = LOG2E / math.sqrt(D)
        tri = kernel_only(q, kv, "int8", cfg["block_m"], bn, cfg["num_warps"], cfg["num_stages"],
                          use_tma=default_use_tma(q.device, D))
        row = dict(B=B, H=H, L=L, D=D, cudnn_ms=round(tc * 1e3, 3), cudnn_tflops=round(flops / tc / 1e12, 1))
        t = timed(tri, reps)
        row.update(triton_ms=round(t * 1e3, 3), triton_x_cudnn=round(tc / t, 3))
        o_tri = tri().clone()
        for var in variants:
            st = var
            kw = _gluon_variant(var)
            fn = lambda: attend_gluon(q, kv, c, "int8", **kw)[0]  # noqa: E731
            try:
                o = fn()
                t = timed(fn, reps)
            except Exception as e:  # noqa: BLE001 — e.g. out of shared memory: record and go on
                row[f"gluon_{st}_error"] = str(e)[:200]
                continue
            row[f"gluon_{st}_ms"] = round(t * 1e3, 3)
            row[f"gluon_{st}_x_cudnn"] = round(tc / t, 3)
            row[f"gluon_{st}_x_triton"] = round(row["triton_ms"] / (t * 1e3), 3)
            row[f"gluon_{st}_vs_triton"] = metrics(o, o_tri)
            row[f"gluon_{st}_vs_cudnn"] = metrics(o, ref)
        row["triton_vs_cudnn"] = metrics(o_tri, ref)
        for impl in ("triton", "gluon"):             # the whole call (K/V pass included), INT8 and FP8 Q·Kᵀ
            for fmt in ("int8", "fp8"):
                t = timed(lambda: quant_attention(q, k, v, impl=impl, qk_format=fmt), reps)
                row[f"call_{impl}_{fmt}_ms"] = round(t * 1e3, 3)
                row[f"call_{impl}_{fmt}_x_cudnn"] = round(tc / t, 3)
        log.info("gluon %s", json.dumps(row))
        rows.append(row)
        q = k = v = kv = ref = o_tri = None
        torch.cuda.empty_cache()
    return rows


def mask_compare(reps: int, shape=(1, 24, 67320 + 256, 128), text=256) -> list:
    """Key-padding masks at HunyuanVideo's joint shape (video tokens, then ``text`` text tokens), whole calls:
    bf16 SDPA with the bool mask (default backend choice, as a bf16 HunyuanVideo step runs it) and cuDNN
    without one, against ``quant_attention`` without a mask, with the mask applied from its first biased key
    tile (the default) and on every tile (``bias_tail=False``, the behaviour before session 10)."""
    B, H, L, D = shape
    q, k, v = inputs(B, H, L, D)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    rows = []
    for name, valid in (("all-true", L), ("text-padded", L - text + 60)):     # a 60-token prompt
        keep = torch.zeros(B, 1, 1, L, dtype=torch.bool, device=q.device)
        keep[..., :valid] = True
        row = dict(shape=f"{B}x{H}x{L}x{D}", mask=name, valid_keys=valid)
        sdpa_mask = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep)  # noqa: E731
        row["sdpa_mask_ms"] = round(timed(sdpa_mask, reps) * 1e3, 3)
        row["cudnn_nomask_ms"] = round(cudnn_seconds(q, k, v, reps) * 1e3, 3)
        row["quant_nomask_ms"] = round(timed(lambda: quant_attention(q, k, v), reps) * 1e3, 3)
        for tail in (True, False):
            fn = lambda: quant_attention(q, k, v, attn_mask=keep, bias_tail=tail)  # noqa: E731
            row[f"quant_mask_{'tail' if tail else 'everywhere'}_ms"] = round(timed(fn, reps) * 1e3, 3)
        o_tail = quant_attention(q, k, v, attn_mask=keep)
        o_all = quant_attention(q, k, v, attn_mask=keep, bias_tail=False)
        row["tail_vs_everywhere_cos_relL2"] = metrics(o_tail, o_all)
        row["tail_vs_sdpa_cos_relL2"] = metrics(o_tail, sdpa_mask().transpose(1, 2))
        for key in ("quant_mask_tail_ms", "quant_mask_everywhere_ms"):
            row[key.replace("_ms", "_x_sdpa_mask")] = round(row["sdpa_mask_ms"] / row[key], 3)
        row["tail_speedup_vs_everywhere"] = round(row["quant_mask_everywhere_ms"] / row["quant_mask_tail_ms"], 3)
        log.info("%s", row)
        rows.append(row)
    return rows


def triton_cdiv(a, b):
    return (a + b - 1) // b


# launch configs (block_m, block_n, warps, stages) swept for head_dim 64 (CogVideoX: 48 heads, LTX: 32)
D64_GRID = [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3),
            (128, 128, 4, 3), (128, 64, 8, 4), (128, 128, 8, 4), (64, 64, 4, 4), (128, 32, 4, 3)]


def sweep(reps: int, quick: bool, shape=(1, 24, 32768, 128), grid=None, formats=("int8", "fp8")) -> list:
    B, H, L, D = shape
    q, k, v = inputs(B, H, L, D)
    flops = 4 * B * H * L * L * D
    rows = []
    # session 6 (H100, `probe_attn_variants.py`, a removed probe (git history)): 64 query rows on 4 warps (the default) beat every
    # 128-row config, which spill at 255 registers; the 128-row ones stay in the grid as the comparison
    if grid is None:
        grid = [(64, 128, 4, 3), (64, 128, 4, 2), (128, 128, 8, 3), (128, 128, 8, 4)]
    if quick:
        grid = grid[:1]
    if D == 64:                                 # the reference point of the sweep: cuDNN at this shape
        t = cudnn_seconds(q, k, v, reps)
        rows.append(dict(fmt="cudnn", B=B, H=H, L=L, D=D, ms=round(t * 1e3, 3), tflops=round(flops / t / 1e12, 1)))
    for fmt in formats:
        for bm, bn, w, s in grid:
            kv = quantize_kv(k, v, fmt, bn)
            cfg = dict(fmt=fmt, bm=bm, bn=bn, warps=w, stages=s, D=D)
            try:
                t = timed(kernel_only(q, kv, fmt, bm, bn, w, s), reps)
                rows.append(dict(cfg, ms=round(t * 1e3, 3), tflops=round(flops / t / 1e12, 1)))
            except Exception as e:  # noqa: BLE001 — out of shared memory / registers: record and go on
                rows.append(dict(cfg, error=str(e)[:160]))
            log.info("sweep %s", rows[-1])
    return rows


def compare(shapes, best: dict, reps: int, best_d64: dict = None) -> list:
    rows = []
    for B, H, L, D in shapes:
        q, k, v = inputs(B, H, L, D)
        flops = 4 * B * H * L * L * D
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        row = dict(B=B, H=H, L=L, D=D)
        ref = None
        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(be):
                    f = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
                    t = timed(f, reps)
                    if ref is None:
                        ref = f().transpose(1, 2)
                row[f"{name}_ms"], row[f"{name}_tflops"] = round(t * 1e3, 3), round(flops / t / 1e12, 1)
            except RuntimeError as e:
                row[f"{name}_error"] = str(e)[:120]
        base = row.get("cudnn_ms") or row.get("flash_ms")
        for fmt, cfg in (best_d64 if D == 64 and best_d64 else best).items():
            bm, bn, w, s = cfg
            kv = quantize_kv(k, v, fmt, bn)
            tma = default_use_tma(q.device, D)                 # as quant_attention below reads K/V
            tk = timed(kernel_only(q, kv, fmt, bm, bn, w, s, use_tma=tma), reps)
            tq = timed(lambda: quantize_kv(k, v, fmt, bn), reps)
            kw = dict(qk_format=fmt, block_n=bn, block_m=bm, num_warps=w, num_stages=s)
            tt = timed(lambda: quant_attention(q, k, v, **kw), reps)
            out = quant_attention(q, k, v, **kw)
            cos, rel = metrics(out, ref) if ref is not None else (None, None)
            row[fmt] = dict(config=dict(bm=bm, bn=bn, warps=w, stages=s, tma=tma),
                            kernel_ms=round(tk * 1e3, 3),
                            kernel_tflops=round(flops / tk / 1e12, 1), quant_kv_ms=round(tq * 1e3, 3),
                            total_ms=round(tt * 1e3, 3), total_tflops=round(flops / tt / 1e12, 1),
                            speedup_kernel_vs_cudnn=round(base / (tk * 1e3), 3) if base else None,
                            speedup_total_vs_cudnn=round(base / (tt * 1e3), 3) if base else None,
                            cos_vs_cudnn=cos, rel_l2_vs_cudnn=rel)
        log.info("compare %s", json.dumps(row))
        rows.append(row)
        q = k = v = qt = kt = vt = ref = None                  # free before the next shape
        torch.cuda.empty_cache()
    return rows


def _best(rows: list) -> dict:
    """Fastest config per format among the sweep rows that ran."""
    best = {}
    for fmt in ("int8", "fp8"):
        ok = [r for r in rows if r["fmt"] == fmt and "ms" in r]
        if ok:
            b = min(ok, key=lambda r: r["ms"])
            best[fmt] = (b["bm"], b["bn"], b["warps"], b["stages"])
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="attention_bench.json")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="two sweep configs, first two shapes")
    ap.add_argument("--sweep-d64", action="store_true",
                    help="also sweep launch configs at head_dim 64 (1 x 48 heads x 17,776 tokens: CogVideoX-5B)")
    ap.add_argument("--d64-only", action="store_true", help="only the head_dim-64 sweep and shapes")
    ap.add_argument("--tma", action="store_true",
                    help="only: pointer vs tensor-descriptor (TMA) K/V loads vs cuDNN at the Wan / Hunyuan shapes")
    ap.add_argument("--gluon", action="store_true",
                    help="only: the Gluon kernel vs the Triton kernel vs cuDNN at the Wan / Hunyuan / head_dim-64 shapes")
    ap.add_argument("--gluon-variants", default="wg2,wg3",
                    help="comma-separated Gluon variants for --gluon: wg<stages> (K/V ring depth)")
    ap.add_argument("--mask", action="store_true",
                    help="only: key-padding masks at HunyuanVideo's joint shape (bias from the first biased tile "
                         "vs on every tile vs bf16 SDPA with the mask)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    if args.mask:
        rows = mask_compare(args.reps)
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=__import__("triton").__version__, mask=rows), f, indent=1)
        return 0
    if args.gluon:
        rows = gluon_compare([(1, 40, 32760, 128), (1, 24, 67320, 128), (1, 48, 17776, 64)], args.reps,
                             tuple(args.gluon_variants.split(",")))
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=__import__("triton").__version__, gluon=rows), f, indent=1)
        return 0
    if args.tma:
        rows = tma_compare([(1, 40, 32760, 128), (1, 24, 67320, 128), (1, 48, 17776, 64)], args.reps)
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=__import__("triton").__version__, tma=rows), f, indent=1)
        return 0
    sw = [] if args.d64_only else sweep(args.reps, args.quick)
    best, best_d64, sw64 = _best(sw), None, []
    if args.sweep_d64 or args.d64_only:
        sw64 = sweep(args.reps, False, shape=(1, 48, 17776, 64), grid=D64_GRID, formats=("int8",))
        best_d64 = _best(sw64)
    shapes = [s for s in SHAPES if s[3] == 64] + [(1, 48, 17776, 64), (1, 32, 6144, 64)] if args.d64_only \
        else (SHAPES[:2] if args.quick else SHAPES)
    rows = compare(shapes, best or best_d64, args.reps, best_d64)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=__import__("triton").__version__, sweep=sw, best=best, sweep_d64=sw64,
                  best_d64=best_d64, shapes=rows)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
