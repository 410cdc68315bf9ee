"""Sweep the activation kernels' launch parameters on the GPU; print and save the best.

    PYTHONPATH=src python benchmarks/tune_act_quant.py --out bench_out

Times ``act_quant`` on bf16 tokens at M = 32768, Hadamard-128 rotation fused, per token
(K = 3072, 5120, 15360) and per 128-block (K = 3072), for

* ``mm``     — the matmul-form rotated kernel (``act_quant_rot_kernel``), every launch config of
  the sweep (block_m × num_warps × num_stages);
* ``legacy`` — the register-hoisted kernel with its tuned ``DEFAULT_CONFIG`` (the default);
  ``legacy_nocache`` the same recomputing the rotation's snap constants in its second pass,
  ``legacy_nosnap`` without the snap (an inexact rotation: what the exact one costs);
* ``norot``  — the legacy kernel without rotation (what the rotation costs on top);
* ``floor``  — a bf16 → fp8 ``copy_`` of the same tensor (read 2 B, write 1 B per element).

``--kernel legacy`` sweeps the default (register-hoisted) kernel instead, block_m down to 16, on the
per-token cases K = 3072 … 15360 (the K-heavy MLP down-projection inputs included).
``--kernel l2`` sweeps the default kernel's second-pass variants on the same per-token cases, at every
``--m``: the second pass walked backwards (``reverse``, starting on the tiles still in L2) and L2 eviction
hints (first pass ``evict_last``, second ``evict_first``), and the second pass dividing through the row
scale's reciprocal with one fma correction (``fma_div``), each with ``--block-ms`` × ``--warps``.
Writes ``act_tune_<kernel>.json`` (every row; the best config overall under "best", the best for
each case under "best_per_case").
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

M = 32768
CASES = [(3072, None), (5120, None), (15360, None), (3072, 128)]
# --kernel legacy: the default register-hoisted kernel, per-token cases incl. the K-heavy MLP inputs
LEGACY_CASES = [(3072, None), (5120, None), (12288, None), (13824, None), (15360, None), (3072, 128)]


def main() -> None:
    from triton.testing import do_bench

    from dvdquant.kernels.triton_act_quant import act_quant
    from dvdquant.numerics.hadamard import hadamard_matrix

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--rep", type=int, default=25)
    ap.add_argument("--kernel", default="mm", choices=["mm", "legacy", "l2"],
                    help="which rotated kernel's launch configs to sweep (legacy = the default kernel, "
                         "l2 = its second-pass order and eviction variants)")
    ap.add_argument("--m", type=int, nargs="+", default=[M])
    ap.add_argument("--block-ms", type=int, nargs="+", default=[16, 32, 64], help="l2: block_m values swept")
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8], help="l2: num_warps values swept")
    ap.add_argument("--stages", type=int, nargs="+", default=[3], help="l2: num_stages values swept")
    ap.add_argument("--variants", nargs="+", default=list(L2_VARIANTS), choices=list(L2_VARIANTS),
                    help="l2: second-pass variants swept")
    args = ap.parse_args()
    if args.kernel == "l2":
        return sweep_l2(args)
    args.m = args.m[0]
    cases = LEGACY_CASES if args.kernel == "legacy" else CASES
    m_tokens = args.m
    os.makedirs(args.out, exist_ok=True)
    t = lambda fn: do_bench(fn, warmup=5, rep=args.rep, return_mode="median")  # noqa: E731
    h = hadamard_matrix(128, device="cuda")
    xs = {k: torch.randn(m_tokens, k, device="cuda", dtype=torch.bfloat16) for k in {c[0] for c in cases}}
    name = lambda k, b: f"K{k}-{'blk' + str(b) if b else 'tok'}"  # noqa: E731
    ref = {}
    for k, b in cases:
        y = torch.empty(m_tokens, k, device="cuda", dtype=torch.float8_e4m3fn)
        ref[name(k, b)] = {
            "floor_copy": t(lambda: y.copy_(xs[k])),
            "legacy": t(lambda: act_quant(xs[k], bits=4, h_block=h, block=b, scales_k_major=b is not None,
                                          kernel="legacy")),
            "legacy_nocache": t(lambda: act_quant(xs[k], bits=4, h_block=h, block=b, scales_k_major=b is not None,
                                                  kernel="legacy", config={"snap_cache": False})),
            "legacy_nosnap": t(lambda: act_quant(xs[k], bits=4, h_block=h, block=b, scales_k_major=b is not None,
                                                 kernel="legacy", config={"snap": False})),
            "norot": t(lambda: act_quant(xs[k], bits=4, block=b, scales_k_major=b is not None)),
        }
        print(name(k, b), {kk: round(v, 3) for kk, v in ref[name(k, b)].items()}, flush=True)
    rows = []
    block_ms = (16, 32, 64, 128) if args.kernel == "legacy" else (32, 64, 128)
    for bm, nw, ns in itertools.product(block_ms, (4, 8), (2, 3, 4)):
        cfg = dict(block_m=bm, num_warps=nw, num_stages=ns)
        row = {"config": cfg, "ms": {}}
        try:
            for k, b in cases:
                fn = lambda: act_quant(xs[k], bits=4, h_block=h, block=b, scales_k_major=b is not None,  # noqa: E731
                                       config=cfg, kernel=args.kernel)
                fn()
                row["ms"][name(k, b)] = t(fn)
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is skipped, and said so
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["total"] = sum(row["ms"].values()) if "error" not in row else float("inf")
        rows.append(row)
        print(cfg, {kk: round(v, 3) for kk, v in row["ms"].items()}, row.get("error", ""), flush=True)
    rows.sort(key=lambda r: r["total"])
    per_case = {name(k, b): min((r for r in rows if name(k, b) in r["ms"]), key=lambda r: r["ms"][name(k, b)])
                for k, b in cases}
    best_per_case = {c: {"config": r["config"], "ms": r["ms"][c]} for c, r in per_case.items()}
    with open(os.path.join(args.out, f"act_tune_{args.kernel}.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "M": m_tokens, "kernel": args.kernel, "reference_ms": ref,
                   "best": rows[0]["config"], "best_per_case": best_per_case, "rows": rows}, f, indent=1)
    for c, v in best_per_case.items():
        print("BEST-PER-CASE", c, json.dumps(v))
    best = rows[0]
    print(f"| case | floor copy ms | no-rot ms | legacy rot ms | {args.kernel} rot ms (best cfg) | {args.kernel} / legacy |")
    print("|---|---|---|---|---|---|")
    for c, v in best["ms"].items():
        r = ref[c]
        print(f"| {c} | {r['floor_copy']:.3f} | {r['norot']:.3f} | {r['legacy']:.3f} | {v:.3f} | "
              f"{v / r['legacy']:.2f} |")
    print("BEST", json.dumps(best["config"]))


L2_VARIANTS = {"div_rn": {"fma_div": False}, "reverse": {"fma_div": False, "reverse": True},
               "evict": {"fma_div": False, "evict1": "evict_last", "evict2": "evict_first"},
               "fma": {"fma_div": True}, "fma_reverse": {"fma_div": True, "reverse": True}}


def sweep_l2(args) -> None:
    """Per-token cases × M × (block_m, warps) × second-pass variant; writes act_tune_l2.json."""
    from triton.testing import do_bench

    from dvdquant.kernels.triton_act_quant import act_quant
    from dvdquant.numerics.hadamard import hadamard_matrix

    os.makedirs(args.out, exist_ok=True)
    t = lambda fn: do_bench(fn, warmup=5, rep=args.rep, return_mode="median")  # noqa: E731
    h = hadamard_matrix(128, device="cuda")
    out = {"device": torch.cuda.get_device_name(), "M": args.m, "kernel": "l2", "cases": {}}
    variants = {v: L2_VARIANTS[v] for v in args.variants}
    for m_tokens in args.m:
        for k in (c[0] for c in LEGACY_CASES if c[1] is None):
            x = torch.randn(m_tokens, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m_tokens, k, device="cuda", dtype=torch.float8_e4m3fn)
            ref_c, ref_s = act_quant(x, bits=4, h_block=h, codes_dtype=torch.int8)
            case = {"floor_copy": t(lambda: y.copy_(x)),
                    "default": t(lambda: act_quant(x, bits=4, h_block=h, codes_dtype=torch.int8)), "rows": []}
            for (vname, var), bm, nw, ns in itertools.product(variants.items(), args.block_ms, args.warps, args.stages):
                cfg = dict(var, block_m=bm, num_warps=nw, num_stages=ns)
                fn = lambda: act_quant(x, bits=4, h_block=h, codes_dtype=torch.int8, config=cfg)  # noqa: E731
                c, s = fn()
                same = bool(torch.equal(c, ref_c) and torch.equal(s, ref_s))
                case["rows"].append({"variant": vname, "config": cfg, "ms": t(fn), "bit_equal": same})
            best = min(case["rows"], key=lambda r: r["ms"])
            case["best"] = best
            out["cases"][f"M{m_tokens}-K{k}"] = case
            print(f"M={m_tokens} K={k} floor {case['floor_copy']:.3f} default {case['default']:.3f} "
                  f"best {best['ms']:.3f} {best['variant']} {best['config']}", flush=True)
    with open(os.path.join(args.out, "act_tune_l2.json"), "w") as f:
        json.dump(out, f, indent=1)
    names = list(out["cases"])
    print("| variant | block_m | warps/stages | " + " | ".join(names) + " |")
    for i, r in enumerate(out["cases"][names[0]]["rows"]):
        print(f"| {r['variant']} | {r['config']['block_m']} | {r['config']['num_warps']}/{r['config']['num_stages']} | "
              + " | ".join(f"{out['cases'][n]['rows'][i]['ms']:.3f}" for n in names) + " |")


if __name__ == "__main__":
    main()
