"""Sweep the fused activation kernel's launch parameters on the GPU; print and save the best.

    PYTHONPATH=src python benchmarks/tune_act_quant.py --out bench_out

Times ``act_quant`` (Hadamard-128, bf16 tokens) at M = 32768 for K = 3072 and 15360, per token
and per 128-block, against a plain device copy of the same bytes (read x, write codes) as the
bandwidth floor. Writes ``act_tune.json`` (all configs, the best one first).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))


def main() -> None:
    from triton.testing import do_bench

    from dvdquant.kernels.triton_act_quant import act_quant
    from dvdquant.numerics.hadamard import hadamard_matrix

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    h = hadamard_matrix(128, device="cuda")
    cases = [(3072, None, h), (3072, 128, h), (15360, None, h), (3072, None, None)]
    xs = {k: torch.randn(32768, k, device="cuda", dtype=torch.bfloat16) for k in (3072, 15360)}
    floor = {}
    for k, x in xs.items():
        y = torch.empty(32768, k, device="cuda", dtype=torch.float8_e4m3fn)   # cast: read 2 B, write 1 B
        floor[k] = do_bench(lambda: y.copy_(x), warmup=5, rep=30, return_mode="median")
    results = []
    for bm, nw, ns, hoist in itertools.product((32, 64, 128), (4, 8), (3,), (False, True)):
        cfg = dict(block_m=bm, num_warps=nw, num_stages=ns, hoist_h=hoist, block_k=256)
        row = {"config": cfg, "ms": {}}
        try:
            for k, block, hh in cases:
                fn = lambda: act_quant(xs[k], bits=4, h_block=hh, block=block, scales_k_major=block is not None,  # noqa
                                       config=cfg)
                fn()
                row["ms"][f"K{k}-blk{block}-rot{hh is not None}"] = do_bench(fn, warmup=5, rep=30,
                                                                            return_mode="median")
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is skipped, and said so
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["total"] = sum(row["ms"].values()) if "error" not in row else float("inf")
        results.append(row)
        print(cfg, {k: round(v, 3) for k, v in row["ms"].items()}, row.get("error", ""), flush=True)
    results.sort(key=lambda r: r["total"])
    with open(os.path.join(args.out, "act_tune.json"), "w") as f:
        json.dump({"copy_floor_ms": floor, "results": results}, f, indent=1)
    print("cast floor (bf16 -> fp8 copy_) ms:", {k: round(v, 3) for k, v in floor.items()})
    print("BEST", json.dumps(results[0]["config"]), {k: round(v, 3) for k, v in results[0]["ms"].items()})


if __name__ == "__main__":
    main()
