"""Is a head's 8-bit attention output the same bits when a call holds fewer heads? (context parallelism)

    PYTHONPATH=src python3 benchmarks/attention_cp_invariance.py --out DIR

Under Ulysses context parallelism each GPU runs attention on a subset of the heads, in the layout the
all-to-all leaves. The kernel itself treats heads independently, but the K/V statistics it needs
(per-head means of K and V, V's per-channel range) were torch reductions, whose split — and so
fp32 summation order — follows the whole tensor's shape. This script measures, at the real shapes,
for the torch statistics and for the fixed-order Triton statistics (``kv_stats_triton``):

* how many statistics differ between one call with every head and two calls with half the heads;
* the attention output's difference (max abs, rel. L2) between the same two ways;
* the time of each statistics pass and of the whole 8-bit attention call.
Writes ``cp_invariance.json``; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench_attention import inputs, timed     # DiT-like Q/K/V; median of CUDA-event timings (same directory)
from dvdquant.kernels import attention_triton as at
from dvdquant.kernels.attention_ref import kv_stats

SHAPES = {"wan14b": (1, 32760, 40, 128), "hunyuan": (1, 67320, 24, 128)}


def timed_ms(fn, reps: int = 10) -> float:
    return round(timed(fn, reps) * 1e3, 3)


def ulysses_halves(t):
    """The two head halves as a rank sees them after the all-to-all: (B, L, H/2, D), contiguous."""
    h = t.shape[2] // 2
    return [t[:, :, i * h:(i + 1) * h].contiguous() for i in range(2)]


def one_shape(name, shape) -> dict:
    B, L, H, D = shape
    q, k, v = inputs(B, H, L, D)
    res = {"shape_BLHD": list(shape)}
    stats_fns = {"torch": kv_stats, "fixed_order": at.kv_stats_triton}
    orig = at.kv_stats_triton
    for label, fn in stats_fns.items():
        full = fn(k, v)
        halves = [fn(kh, vh) for kh, vh in zip(ulysses_halves(k), ulysses_halves(v))]
        split = [torch.cat([a, b], dim=1) for a, b in zip(*halves)]
        res[f"{label}_stats_differing"] = {n: int((a != b).sum()) for n, a, b in
                                           zip(("k_mean", "v_mean", "v_inv"), full, split)}
        at.kv_stats_triton = fn                                   # the attention call uses these statistics
        try:
            for fmt in ("int8",):
                o_full = at.quant_attention(q, k, v, qk_format=fmt)
                o_split = torch.cat([at.quant_attention(a, b, c, qk_format=fmt) for a, b, c in
                                     zip(ulysses_halves(q), ulysses_halves(k), ulysses_halves(v))], dim=2)
                d = (o_full.float() - o_split.float())
                res[f"{label}_{fmt}_out_split_vs_full"] = {
                    "identical": bool(torch.equal(o_full, o_split)), "max_abs": float(d.abs().max()),
                    "rel_l2": float(d.norm() / o_full.float().norm())}
                res[f"{label}_{fmt}_call_ms"] = timed_ms(lambda: at.quant_attention(q, k, v, qk_format=fmt))
        finally:
            at.kv_stats_triton = orig
        res[f"{label}_stats_ms"] = timed_ms(lambda: fn(k, v))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--models", default="wan14b,hunyuan")
    args = ap.parse_args(argv)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "stats_chunk": at.STATS_CHUNK}
    for name in args.models.split(","):
        out[name] = one_shape(name, SHAPES[name])
        print(name, json.dumps(out[name]), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cp_invariance.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
