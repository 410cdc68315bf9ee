"""One denoising step of a full-size video DiT (random weights): bf16 vs dvdquant, side by side.

Speed does not depend on the weight values, so the transformers are built from their diffusers
configs with random weights (Wan 2.1 14B at 480×832×81 frames = 32,760 tokens, HunyuanVideo
13B at 544×960×129 frames = 67,320 tokens). In one process on one GPU, in this order:

1. ``bf16``          — diffusers eager, SDPA (cuDNN/flash as torch picks): step time, peak memory,
                       profiler breakdown (attention / GEMM / other);
2. ``bf16_compile``  — ``torch.compile`` of the same transformer (compile time reported apart),
                       with its breakdown (inductor's fused glue counts as "other");
3. quantize the whole transformer in place (BGR weights + Hadamard-128 rotation folded into
   them, data-free) and time it; weight bytes before/after;
4. ``w4a4`` / ``w4a8`` — fp8 backend eager (A8 = FP8-e4m3 activations), with ``--attention
   dvdquant`` also dvdquant's 8-bit attention (installed if the module exists, else recorded
   as unavailable); peak memory; breakdown (of the eager and the compiled W4A4 steps);
5. ``w4a4_compile`` / ``w4a8_compile`` — ``torch.compile`` of the quantized transformer; the
   δ-GBS switch A4 → A8 → A4 between steps is checked for recompilation (dynamo's frame
   counter) and for extra weight copies (allocated memory before/after the switch).

Writes ``<out>/step_<model>.json`` after every phase (a killed run still leaves its numbers) and
prints a markdown table. Never asserted anywhere.

    python benchmarks/bench_step.py --model wan14b --out results/ [--no-compile] [--attention dvdquant]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("bench_step")

GEMM_KEYS = ("gemm", "xmma", "cutlass", "nvjet", "cublas", "matmul", "scaled_mm", "sm90_", "wgmma")
ATTN_KEYS = ("flash", "fmha", "attention", "attn", "cudnn", "sdpa")


def build(which: str):
    """The transformer (bf16, on the current default device) and one step's inputs."""
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel
    if which == "wan14b":
        m = WanTransformer3DModel()                               # default config = Wan 2.1 14B
        lat = torch.randn(1, 16, 21, 60, 104)                     # 480×832, 81 frames → 32,760 tokens
        kw = dict(timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 512, 4096))
    elif which == "hunyuan":
        m = HunyuanVideoTransformer3DModel()
        lat = torch.randn(1, 16, 33, 68, 120)                     # 544×960, 129 frames → 67,320 tokens
        kw = dict(timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 256, 4096),
                  encoder_attention_mask=torch.ones(1, 256, dtype=torch.long),
                  pooled_projections=torch.randn(1, 768), guidance=torch.tensor([6000.0]))
    else:
        raise SystemExit(f"unknown model {which!r}")
    return m.eval().requires_grad_(False), lat, kw


def time_step(fn, reps: int) -> tuple[float, float]:
    """(first call incl. warm-up/compile, median of ``reps`` timed calls), ms."""
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - t) * 1e3
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return first, sorted(ts)[len(ts) // 2]


def classify(name: str) -> str:
    n = name.lower()
    if "act_quant" in n or "expand_int4" in n:
        return "quant"                       # dvdquant's activation quantization / weight expansion
    if "_quant_kv" in n or "_kv_stats" in n:
        return "attn_prep"                   # the 8-bit attention's K/V statistics and quantization pass
    if any(s in n for s in ATTN_KEYS) and "triton_" not in n[:7]:
        return "attention"
    if "_attn_fwd" in n or "attention_kernel" in n or "attn_fwd" in n:
        return "attention"
    if any(s in n for s in GEMM_KEYS):
        return "gemm"
    return "other"


def breakdown(fn) -> dict:
    """Device time per component (ms) of one call, and the ten most expensive kernels."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    cat: dict = {}
    kernels = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", 0) or 0
        if t <= 0 or e.key.startswith(("ProfilerStep", "aten::", "dvdquant::", "cuda")):
            continue
        k = classify(e.key)
        cat[k] = cat.get(k, 0.0) + t / 1e3
        kernels.append((t / 1e3, e.key[:120], k))
    kernels.sort(reverse=True)
    out = {k: round(v, 1) for k, v in sorted(cat.items())}
    out["total"] = round(sum(cat.values()), 1)
    out["top"] = [[round(t, 1), n, k] for t, n, k in kernels[:10]]
    return out


def weight_bytes(m) -> int:
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


def linear_weight_bytes(m) -> int:
    """Bytes of the weights of the layers dvdquant quantizes (Linear weight or packed QuantLinear)."""
    from dvdquant.nn import QuantLinear
    tot = 0
    for mod in m.modules():
        if isinstance(mod, QuantLinear):
            tot += sum(b.numel() * b.element_size() for b in (mod.qweight, mod.w_scale, mod.w_zero))
    return tot


def attention_variants(m, state, variant, res, save, args):
    """The quantized model with 8-bit attention: W4A4/W4A8 eager and W4A4 + torch.compile. A failure is
    recorded and ends the attention rows."""
    import dvdquant
    rows = [("w4a4_attn8", 4, False), ("w4a8_attn8", 8, False)] + ([] if args.no_compile else
                                                                   [("w4a4_attn8_compile", 4, True)])
    if args.compare_unfused:         # the same W4A4 steps without fused sibling projections, first
        rows.insert(0, ("w4a4_attn8_unfused", 4, False))
        if not args.no_compile:
            rows.append(("w4a4_attn8_compile_unfused", 4, True))
    for name, bits, comp in rows:
        state.a_bits = bits
        dvdquant.set_backend(m, "fp8", fast_accum=args.fast_accum, exact_rotation=not args.inexact_rotation,
                             int8_gemm=not args.no_int8_gemm, fuse_projections=not name.endswith("_unfused")
                             and not args.no_fuse_projections)
        try:
            if comp:
                torch._dynamo.reset()
                _set_target(torch.compile(m))
            variant(name, bits == 4 and not name.endswith("_unfused"))     # eager and compiled W4A4
        except Exception as e:  # noqa: BLE001 - record, go on
            res[f"{name}_error"] = f"{type(e).__name__}: {str(e)[-400:]}"
            save(f"{name}_error")
            break
        finally:
            _set_target(m)


_TARGET: list = []


def _set_target(t) -> None:
    _TARGET[:] = [t]


def install_attention(m, mode: str) -> dict:
    """dvdquant's 8-bit attention if that module exists in this tree, else why not."""
    try:
        from dvdquant.nn.attention import install_quantized_attention
    except ImportError as e:
        return {"available": False, "why": f"{type(e).__name__}: {e}"}
    try:
        counts = install_quantized_attention(m, mode=mode)
    except Exception as e:  # noqa: BLE001 - a broken installer is recorded, the benchmark goes on
        return {"available": False, "why": f"{type(e).__name__}: {str(e)[:300]}"}
    return {"available": True, "mode": mode, "counts": counts}


def main() -> None:
    import dvdquant
    from dvdquant.config import config_to_dict
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wan14b", choices=["wan14b", "hunyuan"])
    ap.add_argument("--out", default="results")
    ap.add_argument("--reps", type=int, default=2, help="timed steps per variant (after one warm-up)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "dvdquant"])
    ap.add_argument("--attention-mode", default="int8", help="dvdquant attention mode (int8 / fp8)")
    ap.add_argument("--attention-impl", default=None, choices=["auto", "triton", "gluon"],
                    help="8-bit attention kernel (quant_attention's impl; default: its DEFAULT_IMPL)")
    ap.add_argument("--attention-only", action="store_true",
                    help="with --attention dvdquant: of the quantized rows, only those with 8-bit attention")
    ap.add_argument("--rotation-block", type=int, default=128)
    ap.add_argument("--quantize-modulation", default="default", choices=["default", "on", "off"],
                    help="AdaLN modulation layers: the config's default, or force weight-only W4 on / bf16 off")
    ap.add_argument("--auto-scale", default="none", choices=["none", "per_block", "per_channel"])
    ap.add_argument("--fast-accum", action="store_true",
                    help="quantized variants with cuBLAS fast FP8 accumulation (set_backend(..., fast_accum=True))")
    ap.add_argument("--a8-format", default="fp8_e4m3", choices=["fp8_e4m3", "int"],
                    help="A8 activations of the W4A8 variant: FP8 e4m3 values (sessions 4-8) or the int grid "
                         "(the library default; int8 codes on the INT8 GEMM)")
    ap.add_argument("--no-int8-gemm", action="store_true",
                    help="int-grid steps on the FP8 GEMM (set_backend(..., int8_gemm=False)): A4 through cuBLAS")
    ap.add_argument("--no-fuse-projections", action="store_true",
                    help="no fused sibling projections (set_backend(..., fuse_projections=False))")
    ap.add_argument("--compare-unfused", action="store_true",
                    help="add W4A4 + 8-bit attention rows without fused projections (w4a4_attn8_unfused, eager, and "
                         "w4a4_attn8_compile_unfused)")
    ap.add_argument("--inexact-rotation", action="store_true",
                    help="quantized variants without the exact rotation's snap (set_backend(..., exact_rotation=False))")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    from dvdquant.kernels import attention_triton
    if args.attention_impl is not None:
        attention_triton.DEFAULT_IMPL = args.attention_impl
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step_{args.model}.json"
    res: dict = {"model": args.model, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "command": " ".join(sys.argv), "reps": args.reps,
                 "attention_impl": attention_triton.DEFAULT_IMPL}

    def save(phase: str):
        res["last_phase"] = phase
        path.write_text(json.dumps(res, indent=1))
        print(f"[{time.strftime('%H:%M:%S')}] {phase}: " + json.dumps({k: v for k, v in res.items()
              if k.endswith(("_ms", "_gb", "_s", "ratio"))}), flush=True)

    torch.set_default_dtype(torch.bfloat16)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        m, lat, kw = build(args.model)
    torch.set_default_dtype(torch.float32)
    lat, kw = lat.cuda(), {k: v.cuda() for k, v in kw.items()}
    torch.cuda.synchronize()
    res["build_s"] = round(time.perf_counter() - t0, 1)
    res["params_b"] = round(sum(p.numel() for p in m.parameters()) / 1e9, 2)
    res["tokens"] = lat[0, 0].numel() // 4
    res["bf16_weight_gb"] = round(weight_bytes(m) / 1e9, 2)
    res["bf16_linear_weight_gb"] = round(sum(mod.weight.numel() * 2 for mod in m.modules()
                                              if isinstance(mod, torch.nn.Linear)) / 1e9, 2)
    _set_target(m)

    def step():
        return _TARGET[0](lat, return_dict=False, **kw)[0]

    def variant(name: str, profile_it: bool):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        first, med = time_step(step, args.reps)
        res[f"{name}_ms"] = round(med, 1)
        res[f"{name}_first_call_ms"] = round(first, 1)
        res[f"{name}_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        if profile_it and not args.no_profile:
            res[f"{name}_breakdown_ms"] = breakdown(step)
        save(name)

    with torch.inference_mode():
        variant("bf16", True)
        if not args.no_compile:
            _set_target(torch.compile(m))
            variant("bf16_compile", True)
            _set_target(m)
            torch._dynamo.reset()
    # ---- quantize (data-free): BGR + rotation folding, on the GPU where the weights are
    na = {"attention": "none"} if "attention" in dvdquant.DVDQuantConfig.__dataclass_fields__ else {}
    if args.quantize_modulation != "default":                       # AdaLN modulation layers, weight-only
        na["quantize_modulation"] = args.quantize_modulation == "on"
    cfg = dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, a8_format=args.a8_format, rotation_block=args.rotation_block,
                                  auto_scale=args.auto_scale, **na)     # attention: installed below, per variant
    res["quant_config"] = config_to_dict(cfg)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    report = dvdquant.quantize_(m, cfg)
    torch.cuda.synchronize()
    res["quantize_s"] = round(time.perf_counter() - t0, 1)
    res["layers"] = len(report.layers)
    res["mean_w_err"], res["mean_w_err_minmax"] = round(report.mean_w_err, 4), round(report.mean_w_err_minmax, 4)
    res["quant_weight_gb"] = round(weight_bytes(m) / 1e9, 2)
    res["weight_bytes_ratio"] = round(res["quant_weight_gb"] / res["bf16_weight_gb"], 3)
    res["quant_linear_weight_gb"] = round(linear_weight_bytes(m) / 1e9, 2)
    res["linear_weight_bytes_ratio"] = round(res["quant_linear_weight_gb"] / res["bf16_linear_weight_gb"], 3)
    save("quantize")
    dvdquant.set_backend(m, "fp8", fast_accum=args.fast_accum, exact_rotation=not args.inexact_rotation,
                         int8_gemm=not args.no_int8_gemm, fuse_projections=not args.no_fuse_projections)
    res["fast_accum"], res["exact_rotation"] = args.fast_accum, not args.inexact_rotation
    res["int8_gemm"], res["fused_projections"] = not args.no_int8_gemm, not args.no_fuse_projections
    state = dvdquant.get_state(m)
    with torch.inference_mode():
        for bits in () if args.attention_only else (4, 8):
            state.a_bits = bits
            variant(f"w4a{bits}", bits == 4)
        if not args.no_compile and not args.attention_only:
            import torch._dynamo.utils as dutils
            _set_target(torch.compile(m))
            state.a_bits = 4
            variant("w4a4_compile", True)
            frames = dict(dutils.counters["stats"])
            mem0 = torch.cuda.memory_allocated()
            state.a_bits = 8
            variant("w4a8_compile", False)
            state.a_bits = 4
            step()
            torch.cuda.synchronize()
            res["gbs_switch"] = {
                "dynamo_stats_before": frames, "dynamo_stats_after": dict(dutils.counters["stats"]),
                "recompiled": dict(dutils.counters["stats"]) != frames,
                "allocated_gb_before": round(mem0 / 1e9, 3),
                "allocated_gb_after": round(torch.cuda.memory_allocated() / 1e9, 3)}
            save("gbs_switch")
            _set_target(m)
            torch._dynamo.reset()
        if args.attention == "dvdquant":          # the same quantized model with 8-bit attention
            res["attention"] = install_attention(m, args.attention_mode)
            save("attention_install")
            if res["attention"]["available"]:
                attention_variants(m, state, variant, res, save, args)
    for k in ("w4a4", "w4a8", "w4a4_compile", "w4a8_compile", "bf16_compile", "w4a4_attn8", "w4a8_attn8",
              "w4a4_attn8_compile", "w4a4_attn8_unfused", "w4a4_attn8_compile_unfused"):
        if f"{k}_ms" in res:
            res[f"{k}_speedup_vs_bf16"] = round(res["bf16_ms"] / res[f"{k}_ms"], 3)
            if "bf16_compile_ms" in res:
                res[f"{k}_speedup_vs_bf16_compile"] = round(res["bf16_compile_ms"] / res[f"{k}_ms"], 3)
    save("done")
    rows = [(k[:-3], res[k], res.get(k[:-3] + "_peak_gb")) for k in res if k.endswith("_ms")
            and not k.endswith("first_call_ms") and isinstance(res[k], float)]
    print(f"\n{args.model} on {res['device']}: quantize {res['quantize_s']} s, weights ×{res['weight_bytes_ratio']}")
    print("| variant | step ms | × bf16 eager | peak GB |\n|---|---|---|---|")
    for name, ms, peak in rows:
        print(f"| {name} | {ms:.0f} | {res['bf16_ms'] / ms:.2f} | {peak} |")


if __name__ == "__main__":
    main()
