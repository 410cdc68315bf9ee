"""Does caching the exact rotation's snap constants between the activation kernel's two passes pay?

    PYTHONPATH=src python benchmarks/probe_snap_cache.py --out bench_out

Times ``act_quant`` (bf16 tokens, Hadamard-128 fused, A4, per token) with ``snap_cache`` on and off
and without the snap, at K = 3072 / 5120 / 12288 and M = 16k / 32k / 64k (``do_bench`` medians, same
process). Writes ``snap_cache.json``; never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))


def main() -> None:
    from triton.testing import do_bench

    from dvdquant.kernels.triton_act_quant import act_quant
    from dvdquant.numerics.hadamard import hadamard_matrix
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--rep", type=int, default=40)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    h = hadamard_matrix(128, device="cuda")
    rows = []
    for k in (3072, 5120, 12288):
        for m in (16384, 32768, 65536):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"K": k, "M": m}
            for name, cfg in (("cache", {"snap_cache": True}), ("no_cache", {"snap_cache": False}),
                              ("no_snap", {"snap": False})):
                row[name] = do_bench(lambda: act_quant(x, bits=4, h_block=h, config=cfg), warmup=10, rep=args.rep,
                                     return_mode="median")
            rows.append(row)
            print(json.dumps({kk: round(v, 4) if isinstance(v, float) else v for kk, v in row.items()}), flush=True)
            del x
    with open(os.path.join(args.out, "snap_cache.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
