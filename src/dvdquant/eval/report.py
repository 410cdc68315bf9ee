"""Turning :func:`dvdquant.eval.quality.evaluate` results into files: JSON, a Markdown report, plots.

* :func:`acceptance` — the issue's acceptance targets, checked on the numbers (never tuned);
* :func:`render_markdown` — the report section (Table-1-style: rows method × bits, best per
  bit-width in bold), with the command that regenerates it and the device it ran on;
* :func:`write_outputs` — results.json, layers.json, quality.md and PNGs into one folder;
* :func:`install_docs` — put a finished run into ``docs/``: the section between
  ``<!-- BEGIN quality -->`` / ``<!-- END quality -->`` of ``docs/RESULTS.md`` (other sections
  untouched; markers appended if absent), ``docs/results.json`` and ``docs/img/quality_*.png``.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

from ..algorithms import registered_methods
from ..data import FACTOR_NAMES

BEGIN, END = "<!-- BEGIN quality -->", "<!-- END quality -->"
EPS = 1e-3   # points: adherence is a float32 mean, so one clip of 120 is 0.83333 ± 1e-5
BASELINES = tuple(n for n, m in registered_methods().items() if m.baseline)   # the method registry's
WEAK_BASELINES = ("minmax", "smoothquant", "quarot")
IMG_SQNR, IMG_GBS, IMG_FRAMES = "quality_sqnr_w4a4.png", "quality_gbs_schedule.png", "quality_frames_w4a4.png"
REPO_DOCS = Path(__file__).resolve().parents[3] / "docs"


# ----------------------------------------------------------------------------- acceptance
def _idx(results) -> dict:
    return {(r["method"], r["bits"]): r for r in results["runs"]}


def _sg(x: float, nd: int = 1) -> str:
    """Signed number, never "-0.0"."""
    return f"{x + 0.0:+.{nd}f}"


def _adh(row) -> dict:
    return row["metrics"]["adherence"]


def acceptance(results: dict) -> dict:
    """Checks of the issue's targets; each {"name", "ok" (True/False/None = not evaluated), "detail"}."""
    idx, fp_adh = _idx(results), results["fp"]["adherence"]
    n = results["meta"]["n_prompts"]
    one_clip = 100.0 / n
    checks: list = []

    def add(name, ok, detail):
        checks.append({"name": name, "ok": ok, "detail": detail})

    def within(row, tol):
        drops = {k: fp_adh[k] - _adh(row)[k] for k in list(FACTOR_NAMES) + ["all"]}
        worst = max(drops[k] for k in FACTOR_NAMES)
        detail = ", ".join(f"{k} {_sg(-d)}" for k, d in drops.items())
        return worst <= tol + EPS, f"adherence vs FP (points): {detail}"

    dvd = idx.get(("dvdquant", "W4A4"))
    base = [idx[(m, "W4A4")] for m in BASELINES if (m, "W4A4") in idx]
    if dvd is not None and base:
        best = max(base, key=lambda r: r["metrics"]["psnr_db"])
        add("W4A4: DVD-Quant has the best PSNR of all methods",
            dvd["metrics"]["psnr_db"] > best["metrics"]["psnr_db"],
            f"DVD-Quant {dvd['metrics']['psnr_db']:.2f} dB; best other {best['label']} "
            f"{best['metrics']['psnr_db']:.2f} dB")
        besta = max(base, key=lambda r: _adh(r)["all"])
        add("W4A4: DVD-Quant has the best adherence of all methods",
            _adh(dvd)["all"] >= _adh(besta)["all"] - EPS,
            f"all-factor adherence DVD-Quant {_adh(dvd)['all']:.1f} %; best other {besta['label']} "
            f"{_adh(besta)['all']:.1f} %")
    if dvd is not None:
        ok, detail = within(dvd, 3.0)
        add("W4A4: DVD-Quant within 3 points of FP adherence on every factor", ok, detail)
        gaps = []
        clear = True
        for m in WEAK_BASELINES:
            r = idx.get((m, "W4A4"))
            if r is None:
                continue
            dp = dvd["metrics"]["psnr_db"] - r["metrics"]["psnr_db"]
            da = _adh(dvd)["all"] - _adh(r)["all"]
            df = {k: _adh(dvd)[k] - _adh(r)[k] for k in FACTOR_NAMES}
            clear &= dp >= 1.0 and da >= one_clip - EPS
            gaps.append(f"{r['label']} vs DVD-Quant: PSNR {_sg(-dp, 2)} dB, adherence(all) {_sg(-da)} pts "
                        f"({', '.join(f'{k} {_sg(-v)}' for k, v in df.items())})")
        if gaps:
            add("W4A4: MinMax / SmoothQuant / QuaRot clearly worse (≥ 1 dB PSNR and ≥ 1 clip of adherence)",
                clear, "; ".join(gaps))
    for b in ("W4A8", "W4A6"):
        r = idx.get(("dvdquant", b))
        if r is not None:
            ok, detail = within(r, 1.0)
            add(f"{b}: DVD-Quant within 1 point of FP adherence on every factor", ok, detail)

    with_attn, no_attn = idx.get(("dvdquant", "W4A8")), idx.get(("dvdquant-no-qattn", "W4A8"))
    if with_attn is not None and no_attn is not None and with_attn["config"]["fields"].get("attention", "none") != "none":
        gaps = {k: _adh(with_attn)[k] - _adh(no_attn)[k] for k in list(FACTOR_NAMES) + ["all"]}
        add("W4A8: with 8-bit attention within 1 point of W4A8 without it (issue #6)",
            all(v >= -1.0 - EPS for v in gaps.values()),
            "adherence with − without (points): " + ", ".join(f"{k} {_sg(v)}" for k, v in gaps.items())
            + f"; PSNR {with_attn['metrics']['psnr_db']:.2f} vs {no_attn['metrics']['psnr_db']:.2f} dB")

    losses = []
    for key, ref_bits in (("dvdquant-no-bgr", "W4A4"), ("dvdquant-no-rotation", "W4A4"),
                          ("dvdquant-no-autoscale", "W4A4"), ("dvdquant-no-gbs", "W4A6")):
        a, ref = idx.get((key, ref_bits)), idx.get(("dvdquant", ref_bits))
        if a is None or ref is None:
            continue
        am, rm = a["metrics"], ref["metrics"]
        loss = {"ablation": a["ablates"], "bits": ref_bits,
                "psnr_drop_db": rm["psnr_db"] - am["psnr_db"], "ssim_drop": rm["ssim"] - am["ssim"],
                "rel_l2_increase": am["rel_l2"] - rm["rel_l2"],
                "adherence_drop": {k: _adh(ref)[k] - _adh(a)[k] for k in list(FACTOR_NAMES) + ["all"]},
                "fd_increase": am["fd"] - rm["fd"], "flicker_increase": am["flicker_vs_fp"] - rm["flicker_vs_fp"]}
        if a.get("layer_sqnr_mean_db") is not None and ref.get("layer_sqnr_mean_db") is not None:
            loss["layer_sqnr_drop_db"] = ref["layer_sqnr_mean_db"] - a["layer_sqnr_mean_db"]
        measurable = loss["psnr_drop_db"] >= 0.1 or loss["adherence_drop"]["all"] >= one_clip - EPS
        losses.append(loss)
        add(f"{ref_bits}: removing {a['ablates']} loses something measurable (≥ 0.1 dB PSNR or ≥ 1 clip)",
            measurable, f"without it: PSNR {_sg(-loss['psnr_drop_db'], 2)} dB, SSIM {_sg(-loss['ssim_drop'], 4)}, "
            f"adherence(all) {_sg(-loss['adherence_drop']['all'])} pts, FD {_sg(loss['fd_increase'], 2)}, "
            f"flicker {_sg(loss['flicker_increase'], 4)}"
            + (f", layer SQNR {_sg(-loss['layer_sqnr_drop_db'], 2)} dB" if "layer_sqnr_drop_db" in loss else "")
            + (" — measurable only through adherence; PSNR, SSIM and flicker are better without it"
               if measurable and loss["psnr_drop_db"] < 0 and loss["ssim_drop"] < 0 else ""))
    most = None
    w4 = [l for l in losses if l["bits"] == "W4A4"]
    if w4:
        m = max(w4, key=lambda l: l["psnr_drop_db"])
        most = {"part": m["ablation"], "psnr_drop_db": m["psnr_drop_db"],
                "adherence_drop_all": m["adherence_drop"]["all"]}
    return {"checks": checks, "ablation_losses": losses, "most_important_part_w4a4": most,
            "one_clip_points": one_clip}


# ----------------------------------------------------------------------------- Markdown
COLUMNS = [  # (header, getter, better: "max"/"min"/None, format)
    ("PSNR dB ↑", lambda r: r["metrics"]["psnr_db"], "max", "{:.2f}"),
    ("SSIM ↑", lambda r: r["metrics"]["ssim"], "max", "{:.4f}"),
    ("rel. L2 ↓", lambda r: r["metrics"]["rel_l2"], "min", "{:.4f}"),
] + [(f"{k} ↑", (lambda k: lambda r: r["metrics"]["adherence"][k])(k), "max", "{:.1f}") for k in FACTOR_NAMES] + [
    ("all ↑", lambda r: r["metrics"]["adherence"]["all"], "max", "{:.1f}"),
    ("FD ↓", lambda r: r["metrics"]["fd"], "min", "{:.2f}"),
    ("flicker ↓", lambda r: r["metrics"]["flicker_vs_fp"], "min", "{:.4f}"),
    ("frame cons.", lambda r: r["metrics"]["frame_consistency"], None, "{:.4f}"),
    ("avg A bits", lambda r: r.get("avg_act_bits"), None, "{:.2f}"),
    ("W err", lambda r: r["cost"]["mean_w_err"], None, "{:.4f}"),
    ("quant. s", lambda r: r["cost"]["quantize_seconds"], None, "{:.2f}"),
    ("calib. passes", lambda r: r["cost"]["calibration_passes"], None, "{:d}"),
]


def regenerate_command(meta: dict) -> str:
    from .quality import BITS, DEFAULT_BATCH, DEFAULT_PROMPTS, METHODS
    parts = ["dvdquant eval"]
    if meta["model"] != "embedded":
        parts.append(f"--model {meta['model']}")
    if list(meta["methods"]) != list(METHODS):
        parts.append(f"--methods {','.join(meta['methods'])}")
    if list(meta["bits"]) != list(BITS):
        parts.append(f"--bits {','.join(meta['bits'])}")
    if meta["n_prompts"] != DEFAULT_PROMPTS:
        parts.append(f"--prompts {meta['n_prompts']}")
    parts += [f"--steps {meta['steps']}", f"--seed {meta['seed']}"]
    if meta.get("guidance", 4.0) != 4.0:
        parts.append(f"--guidance {meta['guidance']}")
    if meta.get("batch_size", DEFAULT_BATCH) != DEFAULT_BATCH:
        parts.append(f"--batch-size {meta['batch_size']}")
    parts.append("--device cuda" if "CUDA" in meta["device"] else "--device cpu")
    if meta.get("layers"):
        parts.append("--layers")
    return " ".join(parts + ["--update-docs"])


def _fmt(v, fmt) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else "−inf"
    return fmt.format(v)


def _table(results: dict) -> list[str]:
    head = ["Method", "W/A"] + [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fp = results["fp"]
    fp_row = {"metrics": fp["metrics"], "cost": {"quantize_seconds": None, "calibration_passes": None},
              "avg_act_bits": None}
    cells = [fp["label"], "FP"] + ["—" if h.startswith(("quant", "calib", "avg", "W err")) else _fmt(get(fp_row), f)
                                   for h, get, _, f in COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
    by_bits: dict = {}
    for r in results["runs"]:
        by_bits.setdefault(r["bits"], []).append(r)
    for bits, rows in by_bits.items():
        best = {}
        for h, get, better, _ in COLUMNS:
            vals = [get(r) for r in rows if get(r) is not None]
            if better and len(rows) > 1 and vals:
                best[h] = max(vals) if better == "max" else min(vals)
        for r in rows:
            cells = [r["label"], bits]
            for h, get, better, f in COLUMNS:
                v = get(r)
                s = _fmt(v, f)
                if h in best and v is not None and abs(v - best[h]) <= 1e-12 * max(1.0, abs(v)):
                    s = f"**{s}**"
                cells.append(s)
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(results: dict, img_prefix: str = "img/") -> str:
    meta, fp, acc = results["meta"], results["fp"], results["acceptance"]
    n = meta["n_prompts"]
    L = ["## Quality: methods × bit-widths on the embedded model (issue #4)", ""]
    L.append(f"Generated by `{regenerate_command(meta)}` on **{meta['device']}** ({meta['created']}; "
             f"torch {meta['torch']}, diffusers {meta['diffusers']}; wall time {meta['wall_seconds']:.0f} s).")
    L.append("")
    L.append(f"Model: {meta['model_description']}. {n} prompts from the fixed construction "
             f"`sample_combinations({n}, seed={meta['prompt_seed']})` (every shape, colour, motion and background "
             f"occurs; not tuned on results), {meta['steps']} Euler steps, CFG {meta['guidance']}, initial noise of "
             f"clip i seeded with {meta['seed']} + i and identical for every method, batches of "
             f"{meta['batch_size']} prompts. Quantized layers run the exact fp32 simulation of the integer "
             "pipeline (`backend=\"simulated\"`).")
    dvd = next((r for r in results["runs"] if r["method"] == "dvdquant" and r["bits"] == "W4A4"), None)
    if dvd is not None:
        f = {k: v for k, v in dvd["config"]["fields"].items() if k not in ("w_bits", "a_bits", "gbs", "skip")}
        L.append("")
        L.append("“DVD-Quant” is `DVDQuantConfig()` of this run with the bit-widths set: "
                 + ", ".join(f"`{k}={v}`" for k, v in f.items()) + ".")
    L.append("")
    L += _table(results)
    L.append("")
    L.append(
        f"PSNR/SSIM: clips vs the FP clips (PSNR capped at 100 dB); rel. L2: final sample vs FP. Adherence: the "
        f"evaluator classifier's accuracy (%) on shape / colour / motion / background of the caption, and on all "
        f"four at once (one clip = {acc['one_clip_points']:.2f} points). FD: Fréchet distance in the classifier's "
        f"256-d feature space to {meta['real_clips']} real generator clips of the same combinations (sampling "
        f"floor, {n} other real clips: {meta['fd_real_floor']:.2f}; real clips' own adherence: "
        f"{meta['real_clip_adherence']['all']:.1f} %). Flicker: mean |Δ_t(q) − Δ_t(FP)| of consecutive-frame "
        f"differences; frame cons.: mean |Δ_t| of the clip itself (FP: {fp['frame_consistency']:.4f}). "
        "Avg A bits: mean activation bits over steps. Quant. s: time of `quantize_` incl. calibration, on this "
        "device. W err: mean relative weight error ‖W − Ŵ‖/‖W‖ over layers (in the rotated basis where rotated). "
        "Bold: best per bit-width (FP row excluded).")
    L.append("")
    L.append("W4A6 is δ-GBS for DVD-Quant and its ablations (A4/A8 per step chosen by δ, `DVDQuantConfig()`'s "
             "`gbs` or `GBSConfig()`'s defaults) and static 6-bit activations for the baselines. "
             "“DVD-Quant − δ-GBS (static A4)” is the W4A6 configuration with δ-GBS off: every step A4 (the same "
             "numerics as DVD-Quant W4A4). Ablations replace one field of `DVDQuantConfig()`: `bgr=None` (MinMax "
             "weights), `rotation=False`, `auto_scale=\"none\"`.")
    L.append("")
    L.append("`--update-docs` writes this section, `docs/results.json` and `docs/img/quality_*.png`; a run made "
             "on another machine (e.g. `python -m dvdquant.cli eval ... --out DIR` on the GPU) is installed with "
             "`dvdquant eval --from-results DIR --update-docs`.")
    L.append("")
    exact = "bit-identical" if fp["rerun_exact"] else "**not** bit-identical (non-deterministic kernels)"
    L.append(f"FP row: a second FP generation compared with the first, {exact}.")
    notes = _observations(results) + _notes(results)
    if notes:
        L.append("")
        L += [f"- {x}" for x in notes]

    gbs_rows = [r for r in results["runs"] if r.get("gbs")]
    if gbs_rows:
        L += ["", "### δ-GBS schedules (W4A6)", "",
              "| Method | δ | low-bit fraction | avg A bits | bits per step (first batch) |", "|---|---|---|---|---|"]
        for r in gbs_rows:
            g = r["gbs"]
            L.append(f"| {r['label']} | {g['delta']} | {g['low_bit_fraction']:.3f} | {g['avg_act_bits']:.2f} | "
                     f"`{' '.join(str(b) for b in g['schedules'][0])}` |")
        L += ["", f"![δ-GBS schedule]({img_prefix}{IMG_GBS})"]

    if any(r.get("layer_sqnr_mean_db") is not None for r in results["runs"]):
        L += ["", "### Layer SQNR (mean over quantized Linear layers and steps, dB)", ""]
        bits = [b for b in meta["bits"]]
        labels = []
        for r in results["runs"]:
            if r["label"] not in labels:
                labels.append(r["label"])
        idx = {(r["label"], r["bits"]): r for r in results["runs"]}
        L += ["| Method | " + " | ".join(bits) + " |", "|---|" + "---|" * len(bits)]
        for lab in labels:
            vals = [idx.get((lab, b), {}).get("layer_sqnr_mean_db") for b in bits]
            L.append(f"| {lab} | " + " | ".join(_fmt(v, "{:.1f}") for v in vals) + " |")
        L += ["", "Output of each QuantLinear vs `F.linear` with the original FP weight on the same (real) input, "
              "per step; per-layer, per-step tables in `results_layers.json`.", "",
              f"![per-layer SQNR at W4A4]({img_prefix}{IMG_SQNR})"]
    L += ["", f"![frames, FP vs each method at W4A4]({img_prefix}{IMG_FRAMES})", ""]

    L += ["### Acceptance (issue #4), checked on these numbers", ""]
    for c in acc["checks"]:
        mark = "✅" if c["ok"] else ("❌" if c["ok"] is False else "—")
        L.append(f"- {mark} {c['name']}: {c['detail']}")
    if acc.get("most_important_part_w4a4"):
        m = acc["most_important_part_w4a4"]
        L.append(f"- Part that matters most at W4A4 (largest PSNR loss when removed): **{m['part']}** "
                 f"(without it: PSNR {_sg(-m['psnr_drop_db'], 2)} dB, adherence(all) {_sg(-m['adherence_drop_all'])} pts)."
                 " δ-GBS is judged at W4A6 against static A4 (above).")
    return "\n".join(L) + "\n"


def _observations(results) -> list[str]:
    """Facts read off the numbers (regenerated with them, never hand-written)."""
    out = []
    runs = results["runs"]
    by_bits: dict = {}
    for r in runs:
        by_bits.setdefault(r["bits"], []).append(r)
    psnr = {b: sum(r["metrics"]["psnr_db"] for r in rs) / len(rs) for b, rs in by_bits.items()}
    out.append("Mean PSNR over the rows of each bit-width: " + ", ".join(f"{b} {v:.1f} dB" for b, v in psnr.items())
               + ".")
    low = [r for r in runs if r["bits"] != "W8A8"]
    if low:
        a = [r["metrics"]["adherence"]["all"] for r in low]
        one = 100.0 / results["meta"]["n_prompts"]
        out.append(f"All-factor adherence of every W4 row lies in {min(a):.1f}–{max(a):.1f} % "
                   f"(FP {results['fp']['adherence']['all']:.1f} %), a spread of {round((max(a) - min(a)) / one)} "
                   "clips: on this model the classifier separates the methods far less than PSNR/SSIM do.")
    idx = _idx(results)
    d, nb = idx.get(("dvdquant", "W4A4")), idx.get(("dvdquant-no-bgr", "W4A4"))
    if d and nb:
        out.append(f"BGR at W4A4: mean weight error {d['cost']['mean_w_err']:.4f} vs {nb['cost']['mean_w_err']:.4f} "
                   f"with MinMax weights; final-sample PSNR {d['metrics']['psnr_db']:.2f} vs "
                   f"{nb['metrics']['psnr_db']:.2f} dB.")
    return out


def _notes(results) -> list[str]:
    out = []
    for r in results["runs"]:
        cs = r["cost"].get("calibrated_steps")
        if r["method"] == "viditq" and cs is not None and cs < results["meta"]["steps"]:
            out.append(f"ViDiT-Q-style at {r['bits']}: calibration recorded statistics for {cs} step index(es), "
                       f"not {results['meta']['steps']}: `quantize_` does not expose the step index while it "
                       "collects statistics, so the timestep-aware balance degenerates to one static balance "
                       "(a weaker baseline than ViDiT-Q; see the report to the lead).")
            break
    if results["meta"].get("incomplete"):
        out.append(f"**Incomplete run** ({results['meta']['incomplete']}): the device time ran out; rows missing.")
    for f in results.get("failed", []):
        out.append(f"{f['method']} at {f['bits']} failed and is missing from the table: {f['error']}")
    if "random" in results["meta"]["model"]:
        out.append("Random-init model and classifier: a development run, the numbers mean nothing.")
    return out


# ----------------------------------------------------------------------------- files
def _json_safe(x, ndigits: int = 6):
    if isinstance(x, float):
        if not math.isfinite(x):
            return None
        return round(x, ndigits)
    if isinstance(x, dict):
        return {k: _json_safe(v, ndigits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v, ndigits) for v in x]
    return x


def _dump(obj, path: Path, ndigits: int = 6) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(obj, ndigits), indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_outputs(results: dict, out_dir, layers: Optional[dict] = None, grid: Optional[dict] = None) -> Path:
    """results.json, layers.json, quality.md, quality_*.png into ``out_dir``."""
    from . import plots
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _dump({k: v for k, v in results.items() if k != "layers"}, out / "results.json")
    if layers:
        _dump(layers, out / "layers.json", 3)
        plots.sqnr_plot(results, layers, out / IMG_SQNR)
    if any(r.get("gbs") for r in results["runs"]):
        plots.gbs_plot(results, out / IMG_GBS)
    if grid:
        plots.frame_grid(grid, out / IMG_FRAMES)
    (out / "quality.md").write_text(render_markdown(results, img_prefix=""))
    return out


def update_results_md(path: Path, section: str) -> None:
    """Replace the text between the quality markers (append the markers if absent)."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Results\n"
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def load_results(run_dir) -> dict:
    """A run folder's results.json, or results.partial.json of a run that was cut short."""
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.exists():
        path = run_dir / "results.partial.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} holds no results.json (nor results.partial.json)")
    results = json.loads(path.read_text())
    results["acceptance"] = acceptance(results)          # recomputed: the checks may have been refined
    return results


def install_docs(run_dir, docs_dir=None) -> list[Path]:
    """Install a finished run (a folder written by :func:`write_outputs`) into ``docs/``."""
    from . import plots
    run_dir = Path(run_dir)
    docs = Path(docs_dir) if docs_dir is not None else REPO_DOCS
    img = docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    results = load_results(run_dir)
    written = []
    layers_path = run_dir / "layers.json"
    if layers_path.exists():
        layers = json.loads(layers_path.read_text())
        shutil.copyfile(layers_path, docs / "results_layers.json")
        plots.sqnr_plot(results, layers, img / IMG_SQNR)
        written += [docs / "results_layers.json", img / IMG_SQNR]
    if any(r.get("gbs") for r in results["runs"]):
        plots.gbs_plot(results, img / IMG_GBS)
        written.append(img / IMG_GBS)
    if (run_dir / IMG_FRAMES).exists():
        shutil.copyfile(run_dir / IMG_FRAMES, img / IMG_FRAMES)
        written.append(img / IMG_FRAMES)
    _dump(results, docs / "results.json")
    update_results_md(docs / "RESULTS.md", render_markdown(results, img_prefix="img/"))
    return written + [docs / "results.json", docs / "RESULTS.md"]
