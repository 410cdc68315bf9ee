"""int4 → FP8 weight handling, two designs side by side (GPU; never asserted):

    PYTHONPATH=src python benchmarks/bench_w4_gemm.py --out bench_out [--m 16384]

* ``expand + cuBLAS`` — the default FP8 path: expand the packed weight into a pooled FP8 buffer
  (:mod:`dvdquant.kernels.expand`), then row-wise ``torch._scaled_mm``;
* ``cuBLAS ready``    — ``_scaled_mm`` on an already-expanded weight (a persistent FP8 copy: the ceiling);
* ``fused Triton``    — :func:`dvdquant.kernels.w4_gemm.w4_fp8_gemm`, the int4 unpack inside the GEMM's
  mainloop (no expanded copy), for a few launch configs;
* ``bf16``            — ``F.linear``, the baseline.
Same activation codes (A4, Hadamard-free) for all; the fused outputs are compared with cuBLAS' (rel. L2,
fp32 out). Writes ``bench_w4_gemm.json`` and ``bench_w4_gemm.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

SHAPES = [("hunyuan", 3072, 12288), ("hunyuan", 12288, 3072), ("hunyuan", 3072, 3072), ("wan14b", 5120, 13824)]
CONFIGS = [dict(block_m=128, block_n=128, block_k=128, group_m=8, num_warps=8, num_stages=3),
           dict(block_m=128, block_n=256, block_k=128, group_m=8, num_warps=8, num_stages=3),
           dict(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=4),
           dict(block_m=64, block_n=128, block_k=128, group_m=8, num_warps=4, num_stages=4)]


def bench(k: int, n: int, m: int, rep: int) -> dict:
    from triton.testing import do_bench

    from dvdquant.kernels.expand import expand_int4_to_fp8
    from dvdquant.kernels.fp8 import gemm_rowwise
    from dvdquant.kernels.triton_act_quant import act_quant
    from dvdquant.kernels.w4_gemm import w4_fp8_gemm

    t = lambda fn: do_bench(fn, warmup=max(5, rep // 5), rep=rep, return_mode="median")  # noqa: E731
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    p = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
    z = torch.randint(0, 16, (n, 1), device="cuda").float()
    ws = torch.rand(n, 1, device="cuda") * 0.01 + 1e-3
    q, s = act_quant(x, bits=4)
    buf = torch.empty(n, k, device="cuda", dtype=torch.float8_e4m3fn)
    w8 = expand_int4_to_fp8(p, z, out=buf).clone()
    r = {"K": k, "N": n, "M": m, "bf16": t(lambda: F.linear(x, w, bias)),
         "cublas_ready": t(lambda: gemm_rowwise(q, s, w8, ws, bias, torch.bfloat16)),
         "expand_cublas": t(lambda: gemm_rowwise(q, s, expand_int4_to_fp8(p, z, out=buf), ws, bias, torch.bfloat16))}
    ref = gemm_rowwise(q, s, w8, ws, None, torch.float32) + bias.float()   # CUDA _scaled_mm: no bias with fp32 out
    r["fused"] = []
    for cfg in CONFIGS:
        try:
            y = w4_fp8_gemm(q, s, p, z, ws, bias.float(), out_dtype=torch.float32, config=cfg)
            rel = float((y - ref).norm() / ref.norm())
            ms = t(lambda: w4_fp8_gemm(q, s, p, z, ws, bias, config=cfg))
            r["fused"].append(dict(cfg, ms=ms, rel=rel))
        except Exception as e:  # noqa: BLE001 - a config that does not compile/fit is recorded, not fatal
            r["fused"].append(dict(cfg, error=" ".join(str(e).split())[:300]))
    ok = [f for f in r["fused"] if "ms" in f]
    r["fused_best"] = min(ok, key=lambda f: f["ms"]) if ok else None
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--m", type=int, nargs="+", default=[16384])
    ap.add_argument("--rep", type=int, default=25)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for model, k, n in SHAPES:
        for m in args.m:
            r = bench(k, n, m, args.rep)
            r["model"] = model
            rows.append(r)
            b = r["fused_best"]
            print(f"{model} {k}->{n} M={m}: bf16 {r['bf16']:.3f} ms, cuBLAS ready {r['cublas_ready']:.3f}, "
                  f"expand+cuBLAS {r['expand_cublas']:.3f}, fused best {b and round(b['ms'], 3)} "
                  f"({b and {kk: b[kk] for kk in ('block_m', 'block_n', 'block_k', 'num_warps', 'num_stages')}}, "
                  f"rel {b and b['rel']:.1e})", flush=True)
    device = torch.cuda.get_device_name()
    with open(os.path.join(args.out, "bench_w4_gemm.json"), "w") as f:
        json.dump({"device": device, "rows": rows}, f, indent=1)
    lines = [f"Device: {device}. do_bench medians (ms); × = bf16 time / path time.", "",
             "| model | K→N | M | bf16 | cuBLAS, ready FP8 weight | expand + cuBLAS | fused Triton (best) | "
             "fused / expand+cuBLAS | rel. err |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["fused_best"]
        fused = f"{b['ms']:.3f} ({r['bf16'] / b['ms']:.2f}×)" if b else "—"
        lines.append(f"| {r['model']} | {r['K']}→{r['N']} | {r['M']} | {r['bf16']:.3f} | "
                     f"{r['cublas_ready']:.3f} ({r['bf16'] / r['cublas_ready']:.2f}×) | "
                     f"{r['expand_cublas']:.3f} ({r['bf16'] / r['expand_cublas']:.2f}×) | {fused} | "
                     f"{b['ms'] / r['expand_cublas']:.2f} | {b['rel']:.1e} |" if b else "")
    with open(os.path.join(args.out, "bench_w4_gemm.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
