"""PNG figures of the quality report (matplotlib, Agg backend; no display needed).

* :func:`sqnr_plot` — per-layer SQNR of every method at one bit-width (and SQNR over steps);
* :func:`gbs_plot` — δ-GBS: share of batches at high bits per step, and the L1 indicator vs δ;
* :func:`frame_grid` — FP vs each method, selected frames of the first prompts.
"""
from __future__ import annotations

from pathlib import Path

import torch


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path) -> Path:
    """Lay out, write (creating the folder) and close a figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    return name.replace("blocks.", "b").replace(".attn1.", ".sa.").replace(".attn2.", ".ca.") \
        .replace(".ffn.net.0.proj", ".ffn.up").replace(".ffn.net.2", ".ffn.down").replace("to_out.0", "out")


def sqnr_plot(results: dict, layers: dict, path, bits: str = "W4A4") -> Path:
    plt = _plt()
    runs = [r for r in results["runs"] if r["bits"] == bits and f"{r['method']}@{bits}" in layers]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 8), gridspec_kw={"height_ratios": [3, 2]})
    names = None
    for r in runs:
        lr = layers[f"{r['method']}@{bits}"]
        names = lr["layers"]
        y = [float("nan") if v is None else v for v in lr["per_layer_db"]]
        style = "-" if r["family"] != "ablation" else "--"
        lw = 2.2 if r["method"] == "dvdquant" else 1.2
        ax1.plot(range(len(y)), y, style, marker=".", lw=lw, label=r["label"])
        ys = [float("nan") if v is None else v for v in lr["per_step_db"]]
        ax2.plot(range(len(ys)), ys, style, marker=".", lw=lw, label=r["label"])
    if names:
        step = max(1, len(names) // 30)
        ax1.set_xticks(range(0, len(names), step))
        ax1.set_xticklabels([_short(n) for n in names[::step]], rotation=70, fontsize=7)
    ax1.set_ylabel("SQNR (dB)")
    ax1.set_title(f"Per-layer output SQNR vs FP layer on the same input, {bits} (all steps)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8, ncol=2)
    ax2.set_xlabel("denoising step")
    ax2.set_ylabel("SQNR (dB), all layers")
    ax2.grid(alpha=0.3)
    return _save(plt, fig, path)


def gbs_plot(results: dict, path) -> Path:
    plt = _plt()
    runs = [r for r in results["runs"] if r.get("gbs")]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for k, r in enumerate(runs):
        g = r["gbs"]
        steps = len(g["high_fraction_per_step"])
        lw = 2.2 if r["method"] == "dvdquant" else 1.0
        avg_bits = [g["low_bits"] + f * (g["high_bits"] - g["low_bits"]) for f in g["high_fraction_per_step"]]
        ax1.step(range(steps), [b + 0.04 * k for b in avg_bits], where="mid", lw=lw,
                 label=f"{r['label']} (low-bit {g['low_bit_fraction']:.2f}, avg {g['avg_act_bits']:.2f} b)")
        ind = g["indicators"]
        mean = []
        for t in range(steps):
            vals = [s[t] for s in ind if t < len(s) and s[t] is not None]
            mean.append(sum(vals) / len(vals) if vals else float("nan"))
        ax2.plot(range(steps), mean, marker=".", lw=lw, label=r["label"])
    if runs:
        g = runs[0]["gbs"]
        ax1.set_yticks([g["low_bits"], (g["low_bits"] + g["high_bits"]) / 2, g["high_bits"]])
        ax2.axhline(g["delta"], color="k", ls=":", lw=1, label=f"δ = {g['delta']}")
    ax1.set_ylabel("activation bits (mean over batches)")
    ax1.set_title("δ-GBS bit schedule over denoising steps (W4A6)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.set_ylabel("L1_t = ‖F_t − F_{t−1}‖₁ / ‖F_{t−1}‖₁")
    ax2.set_xlabel("denoising step")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    return _save(plt, fig, path)


def ascii_label(label: str) -> str:
    return label.replace("−", "-").replace("δ", "d").encode("ascii", "replace").decode()


def frame_grid(grid: dict, path, frames=(0, 5, 10, 15)) -> Path:
    """``grid``: {row label: (B, F, H, W, 3)}; the B clips of a row are tiled sideways."""
    from ..pipeline.video_io import frame_grid_png
    labels = list(grid)
    clips = [torch.cat(list(grid[k]), dim=2) for k in labels]   # (F, H, B·W, 3)
    labels = [ascii_label(k) for k in labels]                   # PIL's default font is ASCII-only
    n_frames = clips[0].shape[0]
    frames = [f for f in frames if f < n_frames] or [0]
    return frame_grid_png(clips, path, row_labels=labels, frames=frames, scale=3)
