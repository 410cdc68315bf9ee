"""FP8 path vs the emulated path on the embedded model's real activations (GPU; writes JSON).

    PYTHONPATH=src python benchmarks/check_fp8_numerics.py --out bench_out

For each configuration (W4A4 / W4A8-e4m3 / per-block / δ-GBS, W4A8 and δ-GBS with int-grid A8,
Hadamard-128 rotation fused in
the kernel) the embedded model is quantized once and run two ways on the same prompts, seed
and initial noise (``--fast-accum``: the fp8 runs with cuBLAS fast FP8 accumulation):

* **per layer**: the inputs of every QuantLinear are recorded at a few denoising steps of the
  emulated run; each layer is then run on exactly those inputs with ``backend="fp8"`` and
  ``backend="emulated"`` at the step's bits, and the relative L2 error
  ‖y_fp8 − y_emu‖ / ‖y_emu‖ is reported (target ≤ 1e-2);
* **clip**: the whole generation with ``fp8`` vs with ``emulated``: PSNR of the decoded clips
  (target ≥ 40 dB) and relative L2 of the final latents.

The emulated path is bit-identical to the simulated reference (CPU tests). For int-grid activations
with per-token scales (INT8 tensor cores; A4 through FP8 ones with ``int8_gemm=False``) the FP8 path is
designed to be bit-identical to it as well (exact snapped rotation, exact
integer GEMM, cuBLAS' epilogue order): each layer's fraction of outputs that differ at all is
recorded, and whether the clips and final latents are equal. A8 e4m3 steps and per-block scales
still round differently. Never asserted; see docs/results/speed.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch


log = logging.getLogger("check_fp8_numerics")
PROMPTS = ["a red circle moving left on a striped background", "a blue square moving up on a dark background",
           "a green triangle moving right on a checkered background", "a yellow cross bouncing on a gradient background"]


def configs():
    import dvdquant
    na = {"attention": "none"}    # keep attention in SDPA: this script checks the linear layers' fp8 path alone
    return {
        "W4A4-rot128": dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, rotation_block=128, auto_scale="none", **na),
        # the same on the INT8 GEMM (the default A4 path on sm90 since session 9; the row above: int8_gemm=False)
        "W4A4int-rot128": dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, rotation_block=128, auto_scale="none", **na),
        "W4A8e4m3-rot128": dvdquant.DVDQuantConfig(w_bits=4, a_bits=8, a8_format="fp8_e4m3", rotation=True, rotation_block=128,
                                                   auto_scale="none", **na),
        "W4A4-rot128-perblock": dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, rotation_block=128,
                                                        auto_scale="per_block", **na),
        "W4A4/8-gbs-rot128": dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, a8_format="fp8_e4m3", rotation_block=128,
                                                     auto_scale="none", gbs=dvdquant.GBSConfig(delta=0.12), **na),
        # A8 on the int grid (the default a8_format): int8 codes and the INT8 GEMM, exact like A4
        "W4A8int-rot128": dvdquant.DVDQuantConfig(w_bits=4, a_bits=8, rotation=True, rotation_block=128, auto_scale="none",
                                                  **na),
        "W4A4/8int-gbs-rot128": dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, rotation_block=128, auto_scale="none",
                                                        gbs=dvdquant.GBSConfig(delta=0.12), **na),
    }


# run with set_backend(..., int8_gemm=True), the default: int-grid steps on the INT8 GEMM (A4 on sm90 only)
INT8_GEMM_CONFIGS = ("W4A4int-rot128", "W4A8int-rot128", "W4A4/8int-gbs-rot128")


def _timed_generation(model, backend: str, steps: int, fast_accum: bool = False, int8_gemm: bool = False):
    """(samples, seconds) of the fixed prompts with every QuantLinear on ``backend``."""
    import dvdquant
    from dvdquant.pipeline import generate
    dvdquant.set_backend(model.transformer, backend, fast_accum=fast_accum, int8_gemm=int8_gemm)
    t0 = time.perf_counter()
    out = generate(model, PROMPTS, seed=0, steps=steps, progress=False)     # δ-GBS: the model's step hook
    return out, time.perf_counter() - t0


def run_config(name, cfg, steps: int, record_steps, device: str = "cuda", fast_accum: bool = False) -> dict:
    import dvdquant
    from dvdquant.numerics.video_metrics import psnr
    from dvdquant.kernels import ExecutionConfig
    from dvdquant.nn.execution import plan
    from dvdquant.models.embedded import load_embedded

    model = load_embedded(device=device, dtype=torch.bfloat16)
    dvdquant.quantize_(model.transformer, cfg)
    layers = dvdquant.quantized_layers(model.transformer)
    state = dvdquant.get_state(model.transformer)
    # 1. emulated generation, recording each layer's inputs at a few steps
    recorded: dict = {}

    def pre_hook(mod, args):
        if state.step_index in record_steps:
            recorded.setdefault(mod.layer_name, []).append((state.step_index, mod.current_a_bits(),
                                                             args[0].detach().clone()))
    handles = [m.register_forward_pre_hook(pre_hook) for _, m in layers]
    emu, t_emu = _timed_generation(model, "emulated", steps)
    schedule = [b for _, b in state.history]
    for h in handles:
        h.remove()
    # 2. per-layer errors on the recorded inputs
    per_layer = {}
    paths = set()
    with torch.no_grad():
        for lname, m in layers:
            errs, diff = [], []
            for step, bits, x in recorded.get(lname, []):
                state.a_bits, state.step_index = bits, step
                state.execution = ExecutionConfig("emulated")
                ye = m(x).float()
                state.execution = ExecutionConfig("fp8", fast_accum=fast_accum, int8_gemm=name in INT8_GEMM_CONFIGS)
                paths.add(plan(m, x.device, bits).path)
                yf = m(x).float()
                errs.append(float((yf - ye).norm() / ye.norm().clamp_min(1e-30)))
                diff.append(float((yf != ye).float().mean()))
            per_layer[lname] = {"max_rel": max(errs), "mean_rel": sum(errs) / len(errs), "calls": len(errs),
                                "differing_outputs_max": max(diff), "K": m.in_features, "N": m.out_features}
    state.reset()
    # 3. fp8 generation, same seed and noise
    f8, t_f8 = _timed_generation(model, "fp8", steps, fast_accum, int8_gemm=name in INT8_GEMM_CONFIGS)
    schedule_f8 = [b for _, b in state.history]
    p = psnr(emu.videos, f8.videos)
    lat_rel = float((f8.latents - emu.latents).norm() / emu.latents.norm())
    worst = max(per_layer.items(), key=lambda kv: kv[1]["max_rel"])
    return {"config": name, "fast_accum": fast_accum, "int8_gemm": name in INT8_GEMM_CONFIGS, "layers": len(layers), "paths": sorted(paths), "steps": steps,
            "record_steps": list(record_steps), "bits_schedule_emulated": schedule, "bits_schedule_fp8": schedule_f8,
            "max_layer_rel": worst[1]["max_rel"], "worst_layer": worst[0],
            "mean_layer_rel": sum(v["mean_rel"] for v in per_layer.values()) / len(per_layer),
            "psnr_db_per_clip": [round(float(v), 2) for v in p], "psnr_db_min": round(float(p.min()), 2),
            "latent_rel_l2": lat_rel, "gen_seconds_emulated": round(t_emu, 2), "gen_seconds_fp8": round(t_f8, 2),
            "layers_bit_identical": sum(v["differing_outputs_max"] == 0.0 for v in per_layer.values()),
            "clips_identical": bool(torch.equal(emu.videos, f8.videos)),
            "latents_identical": bool(torch.equal(emu.latents, f8.latents)),
            "per_layer": per_layer,
            "targets": {"layer_rel<=1e-2": worst[1]["max_rel"] <= 1e-2, "psnr>=40dB": float(p.min()) >= 40.0}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run (the fp8 backend falls back to emulated)")
    ap.add_argument("--fast-accum", action="store_true",
                    help="fp8 path with cuBLAS fast FP8 accumulation (dvdquant.set_backend(..., fast_accum=True))")
    ap.add_argument("--configs", default=None, help="comma list of configuration names (default: all)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device, "torch": torch.__version__, "prompts": PROMPTS, "runs": []}
    wanted = None if args.configs is None else set(args.configs.split(","))
    for name, cfg in configs().items():
        if wanted is not None and name not in wanted:
            continue
        r = run_config(name, cfg, args.steps, record_steps=(0, args.steps // 2, args.steps - 1),
                       device=args.device, fast_accum=args.fast_accum)
        results["runs"].append(r)
        print(f"{name}: paths {r['paths']}, max layer rel {r['max_layer_rel']:.2e} ({r['worst_layer']}), "
              f"mean {r['mean_layer_rel']:.2e}; bit-identical layers {r['layers_bit_identical']}/{r['layers']}; "
              f"clip PSNR min {r['psnr_db_min']} dB (identical: {r['clips_identical']}); latent rel "
              f"{r['latent_rel_l2']:.2e}; schedules equal: {r['bits_schedule_emulated'] == r['bits_schedule_fp8']}",
              flush=True)
    fname = "fp8_numerics_fast_accum.json" if args.fast_accum else "fp8_numerics.json"
    with open(os.path.join(args.out, fname), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
