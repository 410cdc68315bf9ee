"""Per-layer speed of the FP8 path against bf16 at video-DiT GEMM shapes (GPU; never asserted).

    PYTHONPATH=src python benchmarks/bench_linear.py --out bench_out [--m 8192 16384] [--quick]

For each (K → N) of HunyuanVideo and Wan 2.1 14B and each token count M it times, with
``triton.testing.do_bench`` medians on random data:

* ``bf16``      — ``F.linear`` (cuBLAS), the baseline;
* ``fp8_gemm``  — ``_scaled_mm`` row-wise alone on ready FP8 operands (the ceiling);
  ``fp8_gemm_fast`` the same with ``use_fast_accum=True`` (opt-in ``fast_accum``), and
  ``fast_rel`` its relative L2 difference from the exact GEMM on these A4 codes;
* ``act_a4`` / ``act_a8`` / ``act_a4_blk`` — the fused activation kernel (Hadamard-128
  rotation; int4 grid / FP8 e4m3 / per-(token,128) scales), ``act_a4_norot`` without rotation;
  what the exact rotation's snap costs: ``act_a4_nocache`` recomputes the snap constants in the second
  pass, ``act_a4_nosnap`` skips the snap (an inexact rotation; ``a4_nosnap`` the whole layer);
* ``expand``    — packed int4 → FP8 weight expansion into a reused buffer;
* ``a4`` / ``a8`` — the whole layer: activation kernel + expansion + GEMM; ``a4_fast`` with the
  fast-accumulation GEMM; ``a8_int`` the 8-bit int grid (int8 codes, int8 expansion,
  the Triton INT8 GEMM with the fused exact epilogue: the path A6/A8 int steps take by default),
  ``act_a8_int`` its activation kernel; ``a4_int`` the same for A4 codes (the default A4 path on sm90;
  ``a4`` is then the ``int8_gemm=False`` path), ``act_a4_int`` its activation kernel;
  ``a4_persist`` — ``a4`` on an already expanded weight (no expansion: the ceiling of caching it);
  ``a4_blk_1x128`` — per-block scales through blockwise ``_scaled_mm`` (``kernels.fp8.gemm_blockwise``).

``--lean`` times only what the issue's per-layer target is about, side by side: bf16, the INT8 GEMM alone,
and the default A4 layer (activation kernel + int8 expansion + INT8 GEMM) with the activation kernel's
default launch config and with each config of ``--candidates`` (a JSON list), plus each one's activation
kernel alone and a bf16 → fp8 copy of the tokens (the floor of any activation kernel); the candidates'
codes and scales are checked bit-equal to the default's. ``--rounds R`` times all of them R times in turn
and reports medians; single runs moved single points by up to 0.17× on an H100 (docs/results/speed.md, "Linear layer").

``--dynamic`` times one Wan 2.1 14B layer (K = N = 5120 by default, ``--m`` tokens in ``--samples`` samples)
as a whole ``QuantLinear`` on the fp8 backend, W4A4, Hadamard-128 rotation, per-token scales: ``bf16``
(``F.linear``), ``fp8_default`` (the default layer: activation kernel + int8 expansion + INT8 GEMM) and
``fp8_dynamic`` (dynamic smoothing: Λ per sample, the weight re-quantization kernel, the activation kernel
per sample with s_g, one GEMM per sample), plus ``requant`` (the weight kernel alone for all samples),
``absmax`` (Λ per sample alone) and ``profile_<layer>``: each fp8 layer's kernels under ``torch.profiler``
(device ms per call, summed per kernel name, against the call's wall time); writes
``bench_linear_dynamic.json``::

    PYTHONPATH=src python benchmarks/bench_linear.py --dynamic --m 65520 --samples 2 --out bench_out

Inputs are ≥ 48 MB for every M here (larger than the H100's 50 MB L2 only from M = 8k at
K = 3072 on), so one input set is used; weights are re-read from HBM by every GEMM anyway.
Writes ``bench_linear.json`` and ``bench_linear.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F


SHAPES = [("hunyuan", 3072, 3072), ("hunyuan", 3072, 12288), ("hunyuan", 12288, 3072),
          ("hunyuan", 3072, 21504), ("hunyuan", 15360, 3072),
          ("wan14b", 5120, 5120), ("wan14b", 5120, 13824), ("wan14b", 13824, 5120)]


def random_w4_layer(m: int, k: int, n: int, dev: str = "cuda") -> tuple:
    """Random bf16 tokens x (M, K), bf16 weight (N, K) and bias (N,), and a packed int4 weight (N, K/2) with its
    zero points (N, 1) and steps (N, 1): the operands of one layer (speed does not depend on the values)."""
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
    packed = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8)
    zero = torch.randint(0, 16, (n, 1), device=dev).float()
    w_scale = torch.rand(n, 1, device=dev) * 0.01
    return x, w, bias, packed, zero, w_scale


def bench_shape(k: int, n: int, m: int, rep: int, cfg: dict = None, blockwise: bool = True) -> dict:
    from triton.testing import do_bench

    from dvdquant.kernels.expand import expand_int4_to_fp8
    from dvdquant.kernels.expand import expand_int4_to_int8
    from dvdquant.kernels.fp8 import gemm_blockwise, gemm_int8_rowwise, gemm_rowwise
    from dvdquant.kernels.triton_act_quant import act_quant
    from dvdquant.numerics.hadamard import hadamard_matrix

    dev = "cuda"
    t = lambda fn: do_bench(fn, warmup=max(5, rep // 5), rep=rep, return_mode="median")  # noqa: E731
    x, w, bias, packed, zero, w_scale = random_w4_layer(m, k, n, dev)
    h = hadamard_matrix(128, device=dev)
    buf = torch.empty(n, k, device=dev, dtype=torch.float8_e4m3fn)

    act4 = lambda: act_quant(x, bits=4, fmt="int", h_block=h, config=cfg)          # noqa: E731
    act8 = lambda: act_quant(x, bits=8, fmt="fp8", h_block=h, config=cfg)          # noqa: E731
    act4b = lambda: act_quant(x, bits=4, h_block=h, block=128, scales_k_major=True, config=cfg)  # noqa: E731
    expand = lambda: expand_int4_to_fp8(packed, zero, out=buf)                     # noqa: E731
    q4, s4 = act4()
    w8 = expand()
    r = {"K": k, "N": n, "M": m}
    r["bf16"] = t(lambda: F.linear(x, w, bias))
    r["fp8_gemm"] = t(lambda: gemm_rowwise(q4, s4, w8, w_scale, bias, torch.bfloat16))
    r["fp8_gemm_fast"] = t(lambda: gemm_rowwise(q4, s4, w8, w_scale, bias, torch.bfloat16, True))
    y_exact = gemm_rowwise(q4, s4, w8, w_scale, None, torch.float32)
    r["fast_rel"] = float((gemm_rowwise(q4, s4, w8, w_scale, None, torch.float32, True) - y_exact).norm()
                          / y_exact.norm())
    del y_exact
    r["act_a4"], r["act_a8"], r["act_a4_blk"] = t(act4), t(act8), t(act4b)
    r["act_a4_norot"] = t(lambda: act_quant(x, bits=4))
    act4_nosnap = lambda: act_quant(x, bits=4, fmt="int", h_block=h, config=dict(cfg or {}, snap=False))  # noqa: E731
    r["act_a4_nocache"] = t(lambda: act_quant(x, bits=4, fmt="int", h_block=h, config=dict(cfg or {}, snap_cache=False)))
    r["act_a4_nosnap"] = t(act4_nosnap)
    r["expand"] = t(expand)

    def full(act, do_expand=True, fast=False):
        def run():
            q, s = act()
            ww = expand() if do_expand else w8
            return gemm_rowwise(q, s, ww, w_scale, bias, torch.bfloat16, fast)
        return run
    r["a4"], r["a8"], r["a4_persist"] = t(full(act4)), t(full(act8)), t(full(act4, False))
    r["a4_fast"] = t(full(act4, fast=True))
    r["a4_nosnap"] = t(full(act4_nosnap))
    act8i = lambda: act_quant(x, bits=8, fmt="int", h_block=h, config=cfg, codes_dtype=torch.int8)  # noqa: E731
    buf_i8 = torch.empty(n, k, device=dev, dtype=torch.int8)
    r["act_a8_int"] = t(act8i)

    def a8_int():
        q, s = act8i()
        return gemm_int8_rowwise(q, s, expand_int4_to_int8(packed, zero, out=buf_i8), w_scale, bias, torch.bfloat16)
    r["a8_int"] = t(a8_int)
    act4i = lambda: act_quant(x, bits=4, fmt="int", h_block=h, config=cfg, codes_dtype=torch.int8)  # noqa: E731

    def a4_int():
        q, s = act4i()
        return gemm_int8_rowwise(q, s, expand_int4_to_int8(packed, zero, out=buf_i8), w_scale, bias, torch.bfloat16)
    r["act_a4_int"] = t(act4i)
    r["a4_int"] = t(a4_int)
    del buf_i8
    qb, sb = act4b()
    for name, fn in ({"1x128": gemm_blockwise}.items() if blockwise else ()):
        try:
            fn(qb, sb, w8, w_scale, bias, torch.bfloat16)
            torch.cuda.synchronize()
        except (RuntimeError, ValueError, NotImplementedError) as e:
            r[f"blk_{name}_error"] = " ".join(str(e).split())[:400]
            continue
        r[f"gemm_blk_{name}"] = t(lambda: fn(qb, sb, w8, w_scale, bias, torch.bfloat16))
        r[f"a4_blk_{name}"] = t(lambda: fn(*act4b(), expand(), w_scale, bias, torch.bfloat16))
    flops = 2.0 * m * k * n
    for key in [kk for kk in r if kk in ("bf16", "fp8_gemm", "fp8_gemm_fast", "a4", "a8", "a4_persist", "a4_fast",
                                         "a4_nosnap", "a8_int", "a4_int") or kk.startswith(("a4_blk", "gemm_blk"))]:
        r[f"tflops_{key}"] = flops / r[key] / 1e9
    for key in ("fp8_gemm", "fp8_gemm_fast", "a4", "a8", "a4_persist", "a4_fast", "a4_nosnap", "a8_int", "a4_int") + tuple(kk for kk in r if kk.startswith("a4_blk_") and "error" not in kk):
        r[f"speedup_{key}"] = r["bf16"] / r[key]
    del x, w, packed, buf, q4, w8, qb
    torch.cuda.empty_cache()
    return r


def lean_shape(k: int, n: int, m: int, rep: int, candidates: list, rounds: int = 1) -> dict:
    """bf16 vs the default A4 INT8 layer with the default and each candidate activation config, ``rounds``
    times in turn; medians (the speedup: the median of the per-round ratios)."""
    from triton.testing import do_bench

    from dvdquant.kernels.expand import expand_int4_to_int8
    from dvdquant.kernels.fp8 import gemm_int8_rowwise
    from dvdquant.kernels.triton_act_quant import act_quant
    from dvdquant.numerics.hadamard import hadamard_matrix

    t = lambda fn: do_bench(fn, warmup=max(5, rep // 5), rep=rep, return_mode="median")  # noqa: E731
    x, w, bias, packed, zero, w_scale = random_w4_layer(m, k, n)
    h = hadamard_matrix(128, device="cuda")
    buf = torch.empty(n, k, device="cuda", dtype=torch.int8)
    act = lambda cfg: (lambda: act_quant(x, bits=4, h_block=h, config=cfg, codes_dtype=torch.int8))  # noqa: E731

    def layer(cfg):
        def run():
            q, s = act(cfg)()
            return gemm_int8_rowwise(q, s, expand_int4_to_int8(packed, zero, out=buf), w_scale, bias, torch.bfloat16)
        return run
    q0, s0 = act(None)()
    w8 = expand_int4_to_int8(packed, zero, out=buf)
    y8 = torch.empty(m, k, device="cuda", dtype=torch.float8_e4m3fn)
    configs = {"default": None, **{str(i): cfg for i, cfg in enumerate(candidates)}}
    r = {"K": k, "N": n, "M": m, "bit_equal": {}, "floor_copy": t(lambda: y8.copy_(x))}
    for name, cfg in configs.items():
        if cfg is not None:
            q, s = act(cfg)()
            r["bit_equal"][name] = bool(torch.equal(q, q0) and torch.equal(s, s0))
    # rounds alternate every timing, so slow drifts of clock and power hit every variant alike
    runs = {"bf16": [], "int8_gemm": [], **{f"act/{c}": [] for c in configs}, **{f"layer/{c}": [] for c in configs}}
    for _ in range(rounds):
        runs["bf16"].append(t(lambda: F.linear(x, w, bias)))
        runs["int8_gemm"].append(t(lambda: gemm_int8_rowwise(q0, s0, w8, w_scale, bias, torch.bfloat16)))
        for name, cfg in configs.items():
            runs[f"act/{name}"].append(t(act(cfg)))
            runs[f"layer/{name}"].append(t(layer(cfg)))
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    r["bf16"], r["int8_gemm"] = med(runs["bf16"]), med(runs["int8_gemm"])
    r["act"] = {c: med(runs[f"act/{c}"]) for c in configs}
    r["layer"] = {c: med(runs[f"layer/{c}"]) for c in configs}
    r["speedup_rounds"] = {c: [b / v for b, v in zip(runs["bf16"], runs[f"layer/{c}"])] for c in configs}
    r["speedup"] = {c: med(v) for c, v in r["speedup_rounds"].items()}   # median of the per-round ratios
    r["rounds"] = runs
    return r   # the operands die with this frame; the caller empties the CUDA cache


def lean_main(args, device: str) -> None:
    cands = json.loads(args.candidates)
    rows = []
    for model, k, n in SHAPES:
        for m in args.m:
            r = lean_shape(k, n, m, args.rep, cands, args.rounds)
            torch.cuda.empty_cache()
            r["model"] = model
            rows.append(r)
            print(f"{model} {k}->{n} M={m}: bf16 {r['bf16']:.3f} ms, GEMM x{r['bf16'] / r['int8_gemm']:.2f}, "
                  + ", ".join(f"{c}: layer x{r['speedup'][c]:.2f} (rounds {min(r['speedup_rounds'][c]):.2f}–"
                              f"{max(r['speedup_rounds'][c]):.2f}) act {r['act'][c]:.3f}" for c in r["layer"]),
                  flush=True)
            with open(os.path.join(args.out, "bench_linear_lean.json"), "w") as f:
                json.dump({"device": device, "candidates": cands, "rows": rows}, f, indent=1)
    names = list(rows[0]["layer"])
    print("| model | K→N | M | GEMM alone × | " + " | ".join(f"A4 layer × ({c}; rounds min–max)" for c in names)
          + " | floor copy ms | " + " | ".join(f"act ms ({c})" for c in names) + " |")
    for r in rows:
        print(f"| {r['model']} | {r['K']}→{r['N']} | {r['M']} | {r['bf16'] / r['int8_gemm']:.2f} | "
              + " | ".join(f"{r['speedup'][c]:.2f} ({min(r['speedup_rounds'][c]):.2f}–{max(r['speedup_rounds'][c]):.2f})"
                           for c in names) + f" | {r['floor_copy']:.3f} | "
              + " | ".join(f"{r['act'][c]:.3f}" for c in names) + " |")
    sp = [r["speedup"]["default"] for r in rows]
    print(f"default A4 layer: {min(sp):.2f}–{max(sp):.2f}x bf16, >= 1.4x at {sum(v >= 1.4 for v in sp)} of {len(sp)} points "
          f"(medians of {args.rounds} rounds)")
    print("candidates:", json.dumps(cands), "bit-equal everywhere:",
          all(all(r["bit_equal"].values()) for r in rows))


def kernel_profile(fn, calls: int = 5) -> dict:
    """Per call of ``fn``: wall ms and device ms of each kernel (summed by name) under ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / calls
    kernels = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", 0) or 0
        if t > 0 and not e.key.startswith(("ProfilerStep", "aten::", "dvdquant::", "cuda")):
            kernels[e.key[:120]] = [round(t / 1e3 / calls, 3), e.count / calls]
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1][0]))
    return {"wall_ms": round(wall, 3), "kernel_ms": round(sum(v[0] for v in top.values()), 3),
            "kernels_ms_and_launches": top}


def dynamic_main(args, device: str) -> None:
    """bf16 vs the default fp8 layer vs the dynamic-smoothing fp8 layer on one shape (module doc)."""
    from triton.testing import do_bench

    from dvdquant.kernels import ExecutionConfig
    from dvdquant.kernels.weight_requant import requant_weight
    from dvdquant.nn import QuantLinear, RuntimeState
    from dvdquant.numerics import grids
    from dvdquant.numerics.samples import per_sample_absmax

    k, n, m, g = args.k, args.n, args.m[0], args.samples
    t = lambda fn: do_bench(fn, warmup=max(5, args.rep // 5), rep=args.rep, return_mode="median")  # noqa: E731
    lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    w = lin.weight.detach().float()

    def layer(dynamic: bool) -> QuantLinear:
        q = QuantLinear.from_params(lin, grids.quantize_weight_minmax(w, 4), a_bits=4, rotation_block=128,
                                    auto_scale="none")
        if dynamic:
            q.set_dynamic_smoothing(w, alpha=0.5)
        q.state = RuntimeState(execution=ExecutionConfig("fp8"))
        return q
    default, dyn = layer(False), layer(True)
    x = (torch.randn(g, m // g, k, device="cuda") * torch.rand(k, device="cuda") * 3).to(torch.bfloat16)
    s = dyn.dynamic_smoothing(x.reshape(-1, k), g)
    r = {"device": device, "K": k, "N": n, "M": m, "samples": g}
    with torch.no_grad():
        r["bf16"] = t(lambda: torch.nn.functional.linear(x, lin.weight, lin.bias))
        r["fp8_default"] = t(lambda: default(x))
        r["fp8_dynamic"] = t(lambda: dyn(x))
        r["requant"] = t(lambda: requant_weight(dyn.w_master, dyn.w_master_scale, dyn.w_colmax, s, bits=4,
                                                symmetric=False, rotation_block=128))
        r["absmax"] = t(lambda: per_sample_absmax(x.reshape(-1, k), g))
        r["profile_fp8_default"] = kernel_profile(lambda: default(x))
        r["profile_fp8_dynamic"] = kernel_profile(lambda: dyn(x))
    r.update({f"speedup_{p}": r["bf16"] / r[p] for p in ("fp8_default", "fp8_dynamic")})
    print(json.dumps(r, indent=1))
    with open(os.path.join(args.out, "bench_linear_dynamic.json"), "w") as f:
        json.dump(r, f, indent=1)


def markdown(rows: list, device: str) -> str:
    blk = sorted({k[len("speedup_a4_blk_"):] for r in rows for k in r if k.startswith("speedup_a4_blk_")})
    head = ["model", "K→N", "M", "bf16 ms", "bf16 TF", "fp8 GEMM ×", "fast GEMM ×", "A4 ×", "A4 fast ×", "fast rel", "A8 ×", "A4 persist ×",
                                                           "A4 no-snap ×", "A8 int ×", "A4 int8 ×"] + \
        [f"A4 blk {b} ×" for b in blk] + ["act A4 ms", "act A4 no-cache ms", "act A4 no-snap ms", "act A8 ms",
                                           "act blk ms", "act norot ms", "expand ms", "GEMM ms"]
    out = [f"Device: {device}. Speedups are bf16 time / path time (>1 = faster), medians of do_bench.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['K']}→{r['N']}", str(r["M"]), f"{r['bf16']:.3f}", f"{r['tflops_bf16']:.0f}",
                 f"{r['speedup_fp8_gemm']:.2f}", f"{r['speedup_fp8_gemm_fast']:.2f}", f"{r['speedup_a4']:.2f}",
                 f"{r['speedup_a4_fast']:.2f}", f"{r['fast_rel']:.1e}", f"{r['speedup_a8']:.2f}",
                 f"{r['speedup_a4_persist']:.2f}", f"{r['speedup_a4_nosnap']:.2f}", f"{r['speedup_a8_int']:.2f}",
                 f"{r['speedup_a4_int']:.2f}"]
        cells += [f"{r.get('speedup_a4_blk_' + b, float('nan')):.2f}" for b in blk]
        cells += [f"{r[c]:.3f}" for c in ("act_a4", "act_a4_nocache", "act_a4_nosnap", "act_a8", "act_a4_blk",
                                          "act_a4_norot", "expand", "fp8_gemm")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--m", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--rep", type=int, default=60, help="do_bench rep in ms")
    ap.add_argument("--quick", action="store_true", help="two shapes, M = 16k only")
    ap.add_argument("--no-blockwise", action="store_true", help="skip the per-block (1x128) GEMM recipes")
    ap.add_argument("--act-config", default=None,
                    help="JSON launch config of the rotated act_quant kernel (keys of triton_act_quant.DEFAULT_CONFIG)")
    ap.add_argument("--lean", action="store_true",
                    help="only bf16, the INT8 GEMM and the default A4 layer with the default and --candidates act configs")
    ap.add_argument("--candidates", default="[]", help="--lean: JSON list of act_quant launch configs to compare")
    ap.add_argument("--rounds", type=int, default=1,
                    help="--lean: time every variant this many times in turn; report medians (ratios per round)")
    ap.add_argument("--dynamic", action="store_true",
                    help="one layer: bf16 vs fp8 default vs fp8 dynamic smoothing (--k, --n, first --m, --samples)")
    ap.add_argument("--k", type=int, default=5120)
    ap.add_argument("--n", type=int, default=5120)
    ap.add_argument("--samples", type=int, default=2)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = f"{torch.cuda.get_device_name()} (torch {torch.__version__}, cuda {torch.version.cuda})"
    if args.lean:
        return lean_main(args, device)
    if args.dynamic:
        return dynamic_main(args, device)
    if args.act_config:
        device += f"; act_quant config {args.act_config}"
    shapes = SHAPES[:1] + SHAPES[5:6] if args.quick else SHAPES
    ms = [16384] if args.quick else args.m
    rows = []
    t0 = time.time()
    for model, k, n in shapes:
        for m in ms:
            r = bench_shape(k, n, m, args.rep, json.loads(args.act_config) if args.act_config else None,
                            blockwise=not args.no_blockwise)
            r["model"] = model
            rows.append(r)
            print(f"{model} {k}->{n} M={m}: bf16 {r['bf16']:.3f} ms, fp8 gemm x{r['speedup_fp8_gemm']:.2f}, "
                  f"A4 x{r['speedup_a4']:.2f} (no snap x{r['speedup_a4_nosnap']:.2f}), A8 x{r['speedup_a8']:.2f}, "
                  f"A8 int x{r['speedup_a8_int']:.2f}, A4 int8 x{r['speedup_a4_int']:.2f}, "
                  f"act4 {r['act_a4']:.3f} / no-cache {r['act_a4_nocache']:.3f} / no-snap {r['act_a4_nosnap']:.3f} ms, "
                  f"expand {r['expand']:.3f} ms  [{time.time() - t0:.0f}s]", flush=True)
            with open(os.path.join(args.out, "bench_linear.json"), "w") as f:
                json.dump({"device": device, "rows": rows}, f, indent=1)
    md = markdown(rows, device)
    with open(os.path.join(args.out, "bench_linear.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
