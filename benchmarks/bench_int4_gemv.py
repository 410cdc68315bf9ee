"""Weight-only (W4A16) modulation linears at M = 1–2: the int4 GEMV kernel against today's path
(GPU; never asserted).

    PYTHONPATH=src python benchmarks/bench_int4_gemv.py --out bench_out [--quick] [--rep 50]

For each (K → N) of the AdaLN modulation layers and M ∈ {1, 2} it times, with
``triton.testing.do_bench`` medians (L2 flushed before every call, so the weight comes from HBM):

* ``gemv``      — :func:`int4_linear_small_m` with its default launch config;
* ``gemv_best`` — the fastest of a sweep over (block_n, block_k, num_warps, num_stages), recorded as
  ``best_cfg`` (the ``tuning`` list in the JSON holds every config's time and its rel. error);
* ``current``   — the FP8 op's A16 branch: ``expand_int4_to_fp8`` into a reused buffer, then
  ``(w8.float() * w_scale).to(bf16)`` and ``F.linear(x.bf16, w, bias)``;
* ``emulated``  — the path weight-only layers took before the GEMV (unpack, fp32 dequantize, fp32
  matmul: :func:`int4_linear_reference`, the emulated computation);
* ``bf16``      — ``F.linear`` with a ready bf16 weight (the unquantized baseline; reads 2·N·K bytes).

Ratios are path time / GEMV time (> 1 = the GEMV is faster); ``GB/s`` is packed weight bytes
(N·K/2) over the GEMV time (H100 SXM HBM3 peak ≈ 3350 GB/s). Each config's output is checked
against :func:`int4_linear_reference` (rel. L2, bf16 output) and reported, not asserted.
Writes ``bench_int4_gemv.json`` and ``bench_int4_gemv.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import time
from collections import Counter

import torch
import torch.nn.functional as F


log = logging.getLogger("bench_int4_gemv")

SHAPES = [("hunyuan", 3072, 18432), ("hunyuan", 3072, 6144), ("hunyuan", 3072, 9216), ("wan14b", 5120, 30720)]
MS = [1, 2]
BLOCK_NS = (16, 32, 64, 128)
BLOCK_KS = (64, 128, 256, 512)   # codes per K step (half as many packed bytes per row)
NUM_WARPS = (2, 4, 8)
NUM_STAGES = (1, 3)              # 3 is Triton's CUDA default
MAX_PRODUCTS_PER_THREAD = 128    # skip configs whose (M, N, K) fp32 product tile would spill
MIN_PRODUCTS_PER_THREAD = 16     # … or that leave threads nearly idle


def sweep_configs(m: int) -> list:
    """(block_n, block_k, num_warps, num_stages) candidates whose per-step tile fits in registers."""
    import triton

    block_m = triton.next_power_of_2(m)
    grid = itertools.product(BLOCK_NS, BLOCK_KS, NUM_WARPS, NUM_STAGES)
    return [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns) for bn, bk, nw, ns in grid
            if MIN_PRODUCTS_PER_THREAD <= block_m * bn * bk / (32 * nw) <= MAX_PRODUCTS_PER_THREAD]


def bench_shape(k: int, n: int, m: int, rep: int, tune: bool) -> dict:
    from triton.testing import do_bench

    from dvdquant.kernels.expand import expand_int4_to_fp8
    from dvdquant.kernels.int4_gemv import default_config, int4_linear_reference, int4_linear_small_m

    dev = "cuda"
    t = lambda fn: do_bench(fn, warmup=max(5, rep // 5), rep=rep, return_mode="median")  # noqa: E731
    x = torch.nn.functional.silu(torch.randn(m, k, device=dev) * 2).to(torch.bfloat16)
    packed = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8)
    zero = torch.randint(0, 16, (n, 1), device=dev).float()
    w_scale = torch.rand(n, 1, device=dev) * 0.01 + 1e-4
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
    w_bf16 = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    buf = torch.empty(n, k, device=dev, dtype=torch.float8_e4m3fn)
    ref = int4_linear_reference(x, packed, zero, w_scale, bias).float()

    def current():
        w8 = expand_int4_to_fp8(packed, zero, out=buf)
        w = (w8.float() * w_scale).to(torch.bfloat16)
        return F.linear(x, w, bias)

    def gemv(cfg):
        return lambda: int4_linear_small_m(x, packed, zero, w_scale, bias, **cfg)

    def rel_err(cfg):
        y = gemv(cfg)().float()
        return float((y - ref).norm() / ref.norm())

    gbs = lambda ms: n * k / 2 / (ms * 1e-3) / 1e9  # noqa: E731
    r = {"K": k, "N": n, "M": m, "default_cfg": default_config(m)}
    r["gemv"] = t(gemv({}))
    r["gemv_rel_err"] = rel_err({})
    r["current"] = t(current)
    r["emulated"] = t(lambda: int4_linear_reference(x, packed, zero, w_scale, bias))   # the path before the GEMV
    r["bf16"] = t(lambda: F.linear(x, w_bf16, bias))
    r["tuning"] = []
    if tune:
        for cfg in sweep_configs(m):
            try:
                entry = dict(cfg, ms=t(gemv(cfg)), rel_err=rel_err(cfg))
            except Exception as e:  # noqa: BLE001 - a config that fails to compile is recorded, not fatal
                entry = dict(cfg, error=" ".join(str(e).split())[:300])
            r["tuning"].append(entry)
    ok = [e for e in r["tuning"] if "ms" in e]
    best = min(ok, key=lambda e: e["ms"]) if ok else dict(r["default_cfg"], ms=r["gemv"])
    r["gemv_best"] = min(best["ms"], r["gemv"])
    r["best_cfg"] = {kk: best.get(kk) for kk in ("block_n", "block_k", "num_warps", "num_stages")} \
        if best["ms"] < r["gemv"] else dict(r["default_cfg"], num_stages=None)
    r["gbs_gemv"], r["gbs_gemv_best"] = gbs(r["gemv"]), gbs(r["gemv_best"])
    r["current_over_gemv"] = r["current"] / r["gemv"]
    r["emulated_over_gemv"] = r["emulated"] / r["gemv"]
    r["bf16_over_gemv"] = r["bf16"] / r["gemv"]
    torch.cuda.empty_cache()
    return r


def markdown(rows: list, device: str) -> str:
    head = ["model", "K→N", "M", "GEMV µs", "GB/s", "best µs", "best GB/s", "best cfg (bn, bk, warps, stages)",
            "current µs", "emulated µs", "bf16 µs", "current/GEMV ×", "emulated/GEMV ×", "bf16/GEMV ×", "rel err"]
    out = [f"Device: {device}. Medians of do_bench (L2 flushed); × = path time / default-config GEMV time.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = r["best_cfg"]
        cells = [r["model"], f"{r['K']}→{r['N']}", str(r["M"]), f"{r['gemv'] * 1e3:.1f}", f"{r['gbs_gemv']:.0f}",
                 f"{r['gemv_best'] * 1e3:.1f}", f"{r['gbs_gemv_best']:.0f}",
                 f"({c['block_n']}, {c['block_k']}, {c['num_warps']}, {c['num_stages'] or 'dflt'})", f"{r['current'] * 1e3:.1f}",
                 f"{r['emulated'] * 1e3:.1f}", f"{r['bf16'] * 1e3:.1f}", f"{r['current_over_gemv']:.1f}",
                 f"{r['emulated_over_gemv']:.1f}", f"{r['bf16_over_gemv']:.2f}",
                 f"{r['gemv_rel_err']:.1e}"]
        out.append("| " + " | ".join(cells) + " |")
    wins = Counter((r["M"], tuple(r["best_cfg"].values())) for r in rows)
    out += ["", "Winning configs (M, (block_n, block_k, num_warps, num_stages)): count — " +
            ", ".join(f"{k}: {v}" for k, v in wins.most_common())]
    return "\n".join(out) + "\n"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--rep", type=int, default=50, help="do_bench rep in ms")
    ap.add_argument("--quick", action="store_true", help="first shape only, no config sweep")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = f"{torch.cuda.get_device_name()} (torch {torch.__version__}, cuda {torch.version.cuda})"
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = []
    t0 = time.time()
    for model, k, n in shapes:
        for m in MS:
            r = bench_shape(k, n, m, args.rep, tune=not args.quick)
            r["model"] = model
            rows.append(r)
            log.info("%s %d->%d M=%d: gemv %.1f us (%.0f GB/s), best %.1f us %s, current %.1f us, bf16 %.1f us  [%.0fs]",
                     model, k, n, m, r["gemv"] * 1e3, r["gbs_gemv"], r["gemv_best"] * 1e3, r["best_cfg"],
                     r["current"] * 1e3, r["bf16"] * 1e3, time.time() - t0)
            with open(os.path.join(args.out, "bench_int4_gemv.json"), "w") as f:
                json.dump({"device": device, "rows": rows}, f, indent=1)
    md = markdown(rows, device)
    with open(os.path.join(args.out, "bench_int4_gemv.md"), "w") as f:
        f.write(md)
    log.info("%s", md)


if __name__ == "__main__":
    main()
