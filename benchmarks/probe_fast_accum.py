"""Probe: how exact is cuBLAS' fast FP8 accumulation on int-grid codes? (GPU; prints, writes JSON.)

    PYTHONPATH=src python benchmarks/probe_fast_accum.py --out bench_out

``torch._scaled_mm(..., use_fast_accum=True)`` on integer-valued e4m3 operands — A4 codes
(|a| ≤ 7) times int4 weights (|w| ≤ 15), the W4A4 GEMM of the fp8 path — against a float64
integer matmul, for K = 3072 … 30720 and three data patterns: mixed-sign uniform codes,
same-sign codes (sums grow linearly with K) and ±7·±15 with 90 % one sign (sums up to 105·K).
With ``use_fast_accum=False`` every one of these is exact (tests/test_kernels_gpu.py). Writes
``fast_accum_probe.json``; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os

import torch


def operands(pattern: str, m: int, n: int, k: int, g: torch.Generator):
    if pattern == "mixed":
        return (torch.randint(-7, 8, (m, k), device="cuda", generator=g),
                torch.randint(-15, 16, (n, k), device="cuda", generator=g))
    if pattern == "same_sign":
        return (torch.randint(0, 8, (m, k), device="cuda", generator=g),
                torch.randint(0, 16, (n, k), device="cuda", generator=g))
    a = torch.where(torch.rand(m, k, device="cuda", generator=g) < 0.9, 7, -7)
    w = torch.where(torch.rand(n, k, device="cuda", generator=g) < 0.9, 15, -15)
    return a, w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for k in (3072, 15360, 30720):
        for pattern in ("mixed", "same_sign", "extreme"):
            g = torch.Generator(device="cuda").manual_seed(k)
            a, w = operands(pattern, 1024, 512, k, g)
            ref = a.double() @ w.double().t()
            ones_a, ones_b = torch.ones(1024, 1, device="cuda"), torch.ones(1, 512, device="cuda")
            row = {"K": k, "pattern": pattern, "max_abs_sum": float(ref.abs().max())}
            for fast in (False, True):
                y = torch._scaled_mm(a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn).t(), scale_a=ones_a,
                                     scale_b=ones_b, out_dtype=torch.float32, use_fast_accum=fast)
                d = y.double() - ref
                tag = "fast" if fast else "exact"
                row[f"{tag}_max_abs_err"] = float(d.abs().max())
                row[f"{tag}_rel_l2"] = float(d.norm() / ref.norm())
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "fast_accum_probe.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
