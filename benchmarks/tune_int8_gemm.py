"""Launch configurations of the exact INT8 GEMM (pointer loads vs persistent TMA) against cuBLAS FP8 and bf16.

    PYTHONPATH=src python benchmarks/tune_int8_gemm.py --out DIR [--m 16384 65536] [--rep 40]

Why: the int-grid codes of every activation width (A4 as well as A6/A8) can run on the INT8 tensor
cores, whose int32 accumulation is exact at the FP8 peak rate, with the emulated epilogue fused
(:mod:`dvdquant.kernels.int8_gemm`). cuBLAS' FP8 GEMM is exact only in its slower accumulation mode
(``use_fast_accum=False``). This script measures, per layer shape of HunyuanVideo / Wan 14B and token
count M, GEMM alone on ready operands:

* ``bf16`` — ``F.linear`` (cuBLAS), the baseline;
* ``fp8_exact`` / ``fp8_fast`` — row-wise ``_scaled_mm`` on A4 codes, exact / fast accumulation;
* ``int8[i]`` — :func:`int8_gemm` with each entry of ``CONFIGS`` (same A4 codes as int8), checked
  bit-equal to the first config's output (``equal``);
* the whole A4 layer (activation kernel + int4 expansion + GEMM) both ways: ``a4_fp8`` (the current
  path) and ``a4_int8`` (int8 codes, int8 expansion, the best INT8 config of this shape).

Writes ``tune_int8_gemm.json`` to ``--out`` after every shape (a crash keeps what was measured).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import random_w4_layer  # noqa: E402

SHAPES = [("hunyuan", 3072, 3072), ("hunyuan", 3072, 12288), ("hunyuan", 12288, 3072),
          ("hunyuan", 3072, 21504), ("hunyuan", 15360, 3072),
          ("wan14b", 5120, 5120), ("wan14b", 5120, 13824), ("wan14b", 13824, 5120)]


def _cfg(bm, bn, bk, warps, stages, tma, gm=8):
    return dict(block_m=bm, block_n=bn, block_k=bk, group_m=gm, num_warps=warps, num_stages=stages, tma=tma)


CONFIGS = [_cfg(128, 128, 128, 8, 3, False),          # the default before this probe
           _cfg(128, 256, 128, 8, 3, False), _cfg(128, 256, 128, 8, 4, False), _cfg(256, 128, 128, 8, 3, False),
           _cfg(128, 256, 64, 8, 4, False), _cfg(128, 128, 128, 4, 4, False),
           _cfg(128, 128, 128, 8, 4, True), _cfg(128, 256, 128, 8, 3, True), _cfg(128, 256, 128, 8, 4, True),
           _cfg(256, 128, 128, 8, 3, True), _cfg(128, 256, 64, 8, 5, True), _cfg(128, 128, 128, 4, 4, True)]


def bench_shape(k: int, n: int, m: int, rep: int) -> dict:
    from triton.testing import do_bench

    from dvdquant.kernels.expand import expand_int4_to_fp8, expand_int4_to_int8
    from dvdquant.kernels.fp8 import gemm_rowwise
    from dvdquant.kernels.int8_gemm import int8_gemm
    from dvdquant.kernels.triton_act_quant import act_quant
    from dvdquant.numerics.hadamard import hadamard_matrix

    t = lambda fn: do_bench(fn, warmup=max(5, rep // 5), rep=rep, return_mode="median")  # noqa: E731
    dev = "cuda"
    x, w, bias, packed, zero, w_scale = random_w4_layer(m, k, n, dev)
    h = hadamard_matrix(128, device=dev)
    buf8, bufi8 = (torch.empty(n, k, device=dev, dtype=dt) for dt in (torch.float8_e4m3fn, torch.int8))
    act_fp8 = lambda: act_quant(x, bits=4, fmt="int", h_block=h)                                  # noqa: E731
    act_int8 = lambda: act_quant(x, bits=4, fmt="int", h_block=h, codes_dtype=torch.int8)        # noqa: E731
    q8, s = act_fp8()
    qi, si = act_int8()
    w8, wi = expand_int4_to_fp8(packed, zero, out=buf8).clone(), expand_int4_to_int8(packed, zero, out=bufi8).clone()
    r = {"K": k, "N": n, "M": m, "codes_equal": bool(torch.equal(q8.float(), qi.float()) and torch.equal(s, si))}
    r["bf16"] = t(lambda: F.linear(x, w, bias))
    r["fp8_exact"] = t(lambda: gemm_rowwise(q8, s, w8, w_scale, bias, torch.bfloat16))
    r["fp8_fast"] = t(lambda: gemm_rowwise(q8, s, w8, w_scale, bias, torch.bfloat16, True))
    ref = gemm_rowwise(q8, s, w8, w_scale, bias, torch.bfloat16)
    r["int8"] = []
    for cfg in CONFIGS:
        try:
            y = int8_gemm(qi, si, wi, w_scale, bias, torch.bfloat16, config=cfg)
            row = dict(cfg, equal_cublas=bool(torch.equal(y, ref)))
            del y
            row["ms"] = t(lambda: int8_gemm(qi, si, wi, w_scale, bias, torch.bfloat16, config=cfg))
        except Exception as e:  # noqa: BLE001 - a config that does not compile/fit is recorded, not fatal
            row = dict(cfg, error=" ".join(str(e).split())[:300])
        r["int8"].append(row)
    ok = [c for c in r["int8"] if "ms" in c]
    best = min(ok, key=lambda c: c["ms"]) if ok else None
    r["int8_best"] = best
    r["a4_fp8"] = t(lambda: gemm_rowwise(*act_fp8(), expand_int4_to_fp8(packed, zero, out=buf8), w_scale, bias,
                                         torch.bfloat16))
    if best is not None:
        cfg = {kk: best[kk] for kk in CONFIGS[0]}
        r["a4_int8"] = t(lambda: int8_gemm(*act_int8(), expand_int4_to_int8(packed, zero, out=bufi8), w_scale, bias,
                                           torch.bfloat16, config=cfg))
    for key in ("fp8_exact", "fp8_fast", "a4_fp8", "a4_int8"):
        if key in r:
            r[f"x_{key}"] = r["bf16"] / r[key]
    for c in ok:
        c["x_bf16"] = r["bf16"] / c["ms"]
    return r                              # the tensors die with this frame; main() empties the cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--m", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--rep", type=int, default=40, help="do_bench rep in ms")
    ap.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES (default: all)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = f"{torch.cuda.get_device_name()} (torch {torch.__version__}, cuda {torch.version.cuda})"
    shapes = SHAPES if args.shapes is None else [SHAPES[int(i)] for i in args.shapes.split(",")]
    rows, t0 = [], time.time()
    for model, k, n in shapes:
        for m in args.m:
            r = dict(bench_shape(k, n, m, args.rep), model=model)
            rows.append(r)
            torch.cuda.empty_cache()
            b = r["int8_best"] or {}
            print(f"{model} {k}->{n} M={m}: fp8 exact x{r['x_fp8_exact']:.2f} fast x{r['x_fp8_fast']:.2f} | "
                  f"int8 best x{b.get('x_bf16', float('nan')):.2f} ({ {kk: b.get(kk) for kk in CONFIGS[0]} }) | "
                  f"A4 layer fp8 x{r['x_a4_fp8']:.2f} int8 x{r.get('x_a4_int8', float('nan')):.2f} "
                  f"[{time.time() - t0:.0f}s]", flush=True)
            with open(os.path.join(args.out, "tune_int8_gemm.json"), "w") as f:
                json.dump({"device": device, "configs": CONFIGS, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
