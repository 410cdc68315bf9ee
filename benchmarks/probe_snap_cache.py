"""Does caching the exact rotation's snap constants between the activation kernel's two passes pay?

    PYTHONPATH=src python benchmarks/probe_snap_cache.py --out bench_out

Times ``act_quant`` (bf16 tokens, Hadamard-128 fused, A4, per token) with ``snap_cache`` on and off
and without the snap, at K = 3072 / 5120 / 12288 and M = 16k / 32k / 64k (``do_bench`` medians, same
process). ``--layer``: instead, the whole A4 layer on the default path (int8 codes, int8 expansion,
the INT8 GEMM) with the cache on and off, at the linear layers' (K, N), timed in alternating order for
``--rounds`` rounds (a check that the order of measurement does not decide). Writes ``snap_cache.json``
(``snap_cache_layer.json``); never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))


LAYERS = [(3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072), (5120, 5120), (13824, 5120)]


def layer_rows(rep: int, rounds: int, ms=(16384, 65536)) -> list:
    """Whole-layer A4 times (ms) with snap_cache on / off, alternating, ``rounds`` times each."""
    from triton.testing import do_bench

    from dvdquant.kernels.expand import expand_int4_to_int8
    from dvdquant.kernels.fp8 import gemm_int8_rowwise
    from dvdquant.kernels.triton_act_quant import act_quant
    from dvdquant.numerics.hadamard import hadamard_matrix
    h = hadamard_matrix(128, device="cuda")
    rows = []
    for k, n in LAYERS:
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            packed = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
            zero = torch.randint(0, 16, (n, 1), device="cuda").float()
            ws = torch.rand(n, 1, device="cuda") * 0.01
            buf = torch.empty(n, k, device="cuda", dtype=torch.int8)

            def layer(cache):
                q, s = act_quant(x, bits=4, h_block=h, codes_dtype=torch.int8, config={"snap_cache": cache})
                return gemm_int8_rowwise(q, s, expand_int4_to_int8(packed, zero, out=buf), ws, None, torch.bfloat16)
            row = {"K": k, "N": n, "M": m, "cache": [], "no_cache": [], "act_cache": [], "act_no_cache": []}
            for _ in range(rounds):
                for cache in (True, False):
                    key = "cache" if cache else "no_cache"
                    row[key].append(do_bench(lambda: layer(cache), warmup=10, rep=rep, return_mode="median"))
                    row["act_" + key].append(do_bench(
                        lambda: act_quant(x, bits=4, h_block=h, codes_dtype=torch.int8, config={"snap_cache": cache}),
                        warmup=10, rep=rep, return_mode="median"))
            rows.append(row)
            print(json.dumps({kk: [round(v, 4) for v in vv] if isinstance(vv, list) else vv for kk, vv in row.items()}),
                  flush=True)
    return rows


def main() -> None:
    from triton.testing import do_bench

    from dvdquant.kernels.triton_act_quant import act_quant
    from dvdquant.numerics.hadamard import hadamard_matrix
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--rep", type=int, default=40)
    ap.add_argument("--layer", action="store_true", help="whole A4 layers, cache on/off alternating")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.layer:
        rows = layer_rows(args.rep, args.rounds)
        with open(os.path.join(args.out, "snap_cache_layer.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
        return
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
