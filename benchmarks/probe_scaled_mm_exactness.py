"""Probe: is ``torch._scaled_mm`` on integer-valued FP8 operands an exact integer GEMM, and in which
order does its epilogue apply the row/column scales and the bias?

    PYTHONPATH=src python3 benchmarks/probe_scaled_mm_exactness.py --out probe.json

Why this exists: the fp8 path and the emulated path of a W4A4 layer compute the same function, but the
emulated path rounds (c·s)·(Δ·w) products and sums in fp32 while the tensor cores sum integer products of
the codes; the two clips drift apart over a denoising run (results/speed.md §2). If the FP8 GEMM of int4-grid
codes is exact (every partial sum an integer below 2^24) and its epilogue order is known, an emulated path
that does "integer GEMM, then the same epilogue" would make W4A4 bit-exact between the two paths. This
probe measures both facts; nothing here is asserted.

1. Exactness: codes c ∈ [−7, 7] (A4) and w ∈ [−15, 15] (W4 with zero point) as e4m3, unit scales, fp32
   out, exact (``use_fast_accum=False``) and fast accumulation, against an fp64 matmul of the codes; random
   signs and same-sign worst cases; K = 3072 … 15360.
2. Epilogue: random positive fp32 row scales s (M, 1), column scales Δ (1, N) and a bf16 bias, bf16 out;
   the fraction of outputs bitwise equal to each candidate formula evaluated in fp32 from the exact integer
   sums: ``(acc·s)·Δ``, ``acc·(s·Δ)``, ``(acc·Δ)·s``, with the bias added in fp32 before the bf16 rounding,
   or as a fused multiply-add (fp64 then one rounding).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def _codes(m: int, k: int, lim: int, same_sign: bool, g: torch.Generator) -> torch.Tensor:
    if same_sign:
        return torch.full((m, k), float(lim), device="cuda")
    return torch.randint(-lim, lim + 1, (m, k), device="cuda", generator=g).float()


def exactness(ks, m=256, n=256) -> list:
    g = torch.Generator(device="cuda").manual_seed(0)
    one_a, one_b = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
    rows = []
    for k in ks:
        for same in (False, True):
            a, w = _codes(m, k, 7, same, g), _codes(n, k, 15, same, g)
            exact = (a.double() @ w.double().t())
            a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
            row = dict(K=k, same_sign=same, max_abs_sum=float(exact.abs().max()))
            for fast in (False, True):
                y = torch._scaled_mm(a8, w8.t(), scale_a=one_a, scale_b=one_b, out_dtype=torch.float32,
                                     use_fast_accum=fast)
                d = (y.double() - exact).abs()
                row["fast" if fast else "exact"] = dict(bit_exact=bool(torch.equal(y.double(), exact)),
                                                        max_abs_err=float(d.max()),
                                                        rel_l2=float(d.norm() / exact.norm()))
            rows.append(row)
            print("exactness", json.dumps(row), flush=True)
    return rows


def epilogue(ks, m=512, n=512) -> list:
    g = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for k in ks:
        a = torch.randint(-7, 8, (m, k), device="cuda", generator=g).float()
        w = torch.randint(-15, 16, (n, k), device="cuda", generator=g).float()
        acc = (a.double() @ w.double().t()).float()                     # exact integer sums, fp32-exact
        s = torch.rand(m, 1, device="cuda", generator=g) * 0.1 + 1e-3
        dl = torch.rand(1, n, device="cuda", generator=g) * 0.01 + 1e-4
        bias = (torch.randn(n, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
        row = dict(K=k)
        for with_bias in (False, True):
            y = torch._scaled_mm(a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn).t(), scale_a=s, scale_b=dl,
                                 bias=bias if with_bias else None, out_dtype=torch.bfloat16, use_fast_accum=False)
            b32 = bias.float() if with_bias else torch.zeros(n, device="cuda")
            cands = {"(acc*s)*d": (acc * s) * dl, "acc*(s*d)": acc * (s * dl), "(acc*d)*s": (acc * dl) * s}
            for name, v in list(cands.items()):
                cands[name + "+b"] = v + b32
                if with_bias:                                           # one rounding of v·1 + b: an FMA-like add
                    cands[name + " fma b"] = (v.double() + b32.double()).float()
            if with_bias:
                cands["fma(acc*s, d, b)"] = ((acc * s).double() * dl.double() + b32.double()).float()
            key = "bias" if with_bias else "no_bias"
            row[key] = {name: round(float((v.to(torch.bfloat16) == y).float().mean()), 6) for name, v in cands.items()}
        rows.append(row)
        print("epilogue", json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="probe_scaled_mm_exactness.json")
    args = ap.parse_args(argv)
    ks = [3072, 5120, 12288, 13824, 15360]
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, exactness=exactness(ks),
               epilogue=epilogue(ks))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
