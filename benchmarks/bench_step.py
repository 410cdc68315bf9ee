"""One denoising step of a full-size video DiT (random weights), bf16 vs dvdquant, side by side.

Speed does not depend on the weight values, so the transformers are built from their diffusers
configs with random weights (Wan 2.1 14B at 480×832×81 frames, HunyuanVideo 13B at
544×960×129 frames). Measured in one process on one GPU:

* bf16 eager (cuDNN SDPA) step time and peak memory; optionally bf16 + ``torch.compile``;
* time to quantize the whole transformer in place (BGR + rotation folding, data-free);
* the quantized step with the ``fp8`` backend at A4 and A8 (δ-GBS's two kernels), peak memory,
  transformer weight bytes;
* a profiler breakdown (attention / GEMM / other) of both.

Writes ``<out>/step_<model>.json`` and prints a markdown table. Never asserted anywhere.

    python benchmarks/bench_step.py --model wan14b --out results/ [--compile]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def build(which: str):
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
    return m.eval(), lat, kw


def time_step(fn, n: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


def breakdown(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    cat: dict = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", 0) or 0
        name = e.key.lower()
        if t <= 0:
            continue
        if any(s in name for s in ("gemm", "xmma", "cutlass", "nvjet", "cublas", "matmul", "scaled_mm")):
            k = "gemm"
        elif any(s in name for s in ("flash", "fmha", "attention", "cudnn", "sdpa")):
            k = "attention"
        else:
            k = "other"
        cat[k] = cat.get(k, 0) + t / 1e3
    return {k: round(v, 1) for k, v in cat.items()}


def weight_bytes(m) -> int:
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


def main():
    import dvdquant
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan14b", choices=["wan14b", "hunyuan"])
    ap.add_argument("--out", default="results")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--rotation-block", type=int, default=128)
    ap.add_argument("--auto-scale", default="none", choices=["none", "per_block", "per_channel"])
    args = ap.parse_args()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        m, lat, kw = build(args.model)
    lat, kw = lat.cuda(), {k: v.cuda() for k, v in kw.items()}
    step = lambda: m(lat, return_dict=False, **kw)[0]              # noqa: E731
    res = {"model": args.model, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "params_b": round(sum(p.numel() for p in m.parameters()) / 1e9, 2), "tokens": lat[0, 0].numel() // 4}
    with torch.inference_mode():
        torch.cuda.reset_peak_memory_stats()
        res["bf16_ms"] = time_step(step)
        res["bf16_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        res["bf16_breakdown_ms"] = breakdown(step)
        res["bf16_weight_gb"] = round(weight_bytes(m) / 1e9, 2)
        if args.compile:
            mc = torch.compile(m)
            res["bf16_compile_ms"] = time_step(lambda: mc(lat, return_dict=False, **kw)[0])
            del mc
    cfg = dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, rotation_block=args.rotation_block, auto_scale=args.auto_scale)
    torch.set_default_dtype(torch.float32)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    report = dvdquant.quantize_(m, cfg)
    torch.cuda.synchronize()
    res["quantize_s"] = round(time.perf_counter() - t0, 1)
    res["layers"] = len(report.layers)
    res["quant_weight_gb"] = round(weight_bytes(m) / 1e9, 2)
    dvdquant.set_backend(m, "fp8")
    state = dvdquant.get_state(m)
    torch.cuda.empty_cache()
    with torch.inference_mode():
        for bits in (4, 8):
            state.a_bits = bits
            torch.cuda.reset_peak_memory_stats()
            res[f"w4a{bits}_ms"] = time_step(step)
            res[f"w4a{bits}_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        state.a_bits = 4
        res["w4a4_breakdown_ms"] = breakdown(step)
        if args.compile:
            mc = torch.compile(m)
            res["w4a4_compile_ms"] = time_step(lambda: mc(lat, return_dict=False, **kw)[0])
    for k in ("w4a4", "w4a8"):
        res[f"{k}_speedup_vs_bf16"] = round(res["bf16_ms"] / res[f"{k}_ms"], 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_{args.model}.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
