"""``dvdquant demo``: the embedded model, FP vs DVD-Quant W4A4, side by side, with a report.

Runs on a fresh CPU machine in well under two minutes: a few prompts, FP and quantized
generations from the same seeds and initial noise, an MP4 + GIF side-by-side grid, a PNG frame
grid and a short text/JSON report (fidelity, time to quantize, weight memory). The output
folder is checked before any work and removed again if the demo created it and does not finish.
"""
from __future__ import annotations

import copy
import json
import time

import torch

from .. import api
from ..config import DVDQuantConfig
from ..numerics.video_metrics import psnr, ssim
from ..fileio import atomic_write_text, check_output_dir, output_dir
from .checks import check_prompts, check_steps
from .generate import generate
from .models_io import weight_bytes
from .video_io import frame_grid_png, save_video

DEMO_PROMPTS = (
    "a red circle moving left on a striped background",
    "a blue square moving up on a dark background",
    "a yellow triangle growing on a checkered background",
    "a green cross bouncing on a gradient background",
)


def side_by_side(a: torch.Tensor, b: torch.Tensor, gap: int = 2) -> torch.Tensor:
    """(B, F, H, W, 3) pairs → one (1, F, 2H + gap, B·W + gaps, 3) mosaic: FP on top, quantized below."""
    bsz, f, h, w, c = a.shape
    out = torch.ones(1, f, 2 * h + gap, bsz * (w + gap) - gap, c)
    for i in range(bsz):
        x0 = i * (w + gap)
        out[0, :, :h, x0:x0 + w] = a[i]
        out[0, :, h + gap:, x0:x0 + w] = b[i]
    return out


def run_demo(out_dir="dvdquant_demo", steps: int = 20, seed: int = 0, config: DVDQuantConfig | None = None,
             prompts=DEMO_PROMPTS, progress: bool = True) -> dict:
    prompts, steps = check_prompts(prompts), check_steps(steps)
    check_output_dir(out_dir)
    with output_dir(out_dir) as out:
        return _run_demo(out, steps, seed, config or DVDQuantConfig(w_bits=4, a_bits=4), prompts, progress)


def _run_demo(out, steps, seed, config, prompts, progress) -> dict:
    from ..models.embedded import load_embedded
    tag = f"W{config.w_bits}A{config.a_bits}"
    model = load_embedded()
    t0 = time.perf_counter()
    fp = generate(model, prompts, seed=seed, steps=steps, progress=progress, progress_desc="FP")
    fp_s = time.perf_counter() - t0

    qmodel = copy.copy(model)
    qmodel.transformer = copy.deepcopy(model.transformer)
    report = api.quantize_(qmodel.transformer, config, progress=progress)
    t0 = time.perf_counter()
    q = generate(qmodel, prompts, seed=seed, steps=steps, progress=progress, progress_desc=f"DVD-Quant {tag}")
    gen_s = time.perf_counter() - t0

    mosaic = side_by_side(fp.videos, q.videos)
    save_video(mosaic, out / "side_by_side.mp4")
    save_video(mosaic, out / "side_by_side.gif")
    rows = [clip for pair in zip(fp.videos, q.videos) for clip in pair]       # FP, quantized per prompt
    labels = [f"{t} #{i + 1}" for i in range(len(prompts)) for t in ("FP", tag)]
    frame_grid_png(rows, out / "frames.png", row_labels=labels, scale=2)
    result = {
        "prompts": list(prompts), "steps": steps, "seed": seed, "method": f"DVD-Quant {tag} (BGR + ARQ), simulated"
        + (f", {config.attention} attention" if config.attention != "none" else ""),
        "layers_quantized": len(report.layers), "quantize_seconds": round(report.seconds, 3),
        "mean_weight_rel_error": round(report.mean_w_err, 5),
        "mean_weight_rel_error_minmax": round(report.mean_w_err_minmax, 5),
        "psnr_db": [round(float(v), 2) for v in psnr(fp.videos, q.videos)],
        "ssim": [round(float(v), 4) for v in ssim(fp.videos, q.videos)],
        "transformer_weight_mb_fp32": round(weight_bytes(model.transformer) / 2 ** 20, 2),
        "transformer_weight_mb_quantized": round(weight_bytes(qmodel.transformer) / 2 ** 20, 2),
        "fp_generation_seconds": round(fp_s, 2),
        "quantized_generation_seconds": round(gen_s, 2),
    }
    atomic_write_text(out / "report.json", json.dumps(result, indent=2))
    atomic_write_text(out / "report.txt", format_report(result))
    return result


def format_report(r: dict) -> str:
    lines = [f"dvdquant demo — {r['method']}, {r['steps']} steps, seed {r['seed']}",
             f"quantized {r['layers_quantized']} layers in {r['quantize_seconds']} s; mean relative weight error "
             f"‖W − Ŵ‖/‖W‖ {r['mean_weight_rel_error']} (MinMax rounding at the same bits: "
             f"{r['mean_weight_rel_error_minmax']}; lower is better)",
             f"transformer weights: {r['transformer_weight_mb_fp32']} MB fp32 → "
             f"{r['transformer_weight_mb_quantized']} MB quantized (packed int4 + scales + FP embedders)",
             "fidelity of each quantized clip to the FP clip of the same prompt, seed and initial noise",
             "(PSNR in dB over all frames: higher is closer, identical clips give 100; SSIM: 1 = identical):"]
    for p, a, s in zip(r["prompts"], r["psnr_db"], r["ssim"]):
        lines.append(f"  PSNR {a:6.2f} dB  SSIM {s:.4f}  {p}")
    if r.get("fp_generation_seconds"):
        lines.append(f"sampling time: FP {r['fp_generation_seconds']} s, quantized {r['quantized_generation_seconds']} s "
                     f"({r['quantized_generation_seconds'] / r['fp_generation_seconds']:.1f}×: the quantized layers run "
                     "the exact fp32 reference of the integer pipeline, not integer kernels)")
    lines += ["how to read it: on this small model the 4-bit weights dominate the error. Over 480 prompts "
              "(docs/RESULTS.md) W4A4 averages 17.8–20.5 dB by method (DVD-Quant 20.4, above every baseline) and W4A8 "
              "22.2–23.0 dB, while a caption classifier recognises shape, colour, motion and background in W4 clips",
              "as often as in FP ones (96–99 % vs 98.3 %): the clips differ in pixels more than in content "
              "(compare the rows of frames.png)."]
    return "\n".join(lines) + "\n"
