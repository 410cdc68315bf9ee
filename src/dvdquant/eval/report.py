"""Turning evaluation runs (:func:`dvdquant.eval.quality.evaluate`) into the report: intervals, files.

* :func:`finish` — one run folder, or several folders of a run split by method / bits (merged by
  :func:`dvdquant.eval.store.merge_runs`), analysed and written as results.json, quality.md, PNGs;
* :func:`analyse` — paired 95 % intervals (:mod:`dvdquant.eval.compare`) and the PSNR power;
* :func:`render_markdown` — the report section: rows method × bits with intervals, the paired
  differences, the prompts a ±0.3 dB PSNR interval needs, the command(s) that regenerate it.

Installing a report into the repository's ``docs/`` and the acceptance checks of issue #4 are
``scripts/update_results_docs.py``, not the library. This module imports
:mod:`dvdquant.eval.quality` (its method and bit-width tables), never the reverse.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from ..algorithms import registered_methods
from ..errors import DVDQuantError
from . import compare as cmp
from . import store
from .stats import verdict

BASELINES = tuple(n for n, m in registered_methods().items() if m.baseline)   # the method registry's
IMG_SQNR, IMG_GBS, IMG_FRAMES = "quality_sqnr_w4a4.png", "quality_gbs_schedule.png", "quality_frames_w4a4.png"
DOCS_SCRIPT = "scripts/update_results_docs.py"   # installs a report into the repository's docs/ (not the library)


def index_runs(results) -> dict:
    """{(method, bits): row} of a results dict."""
    return {(r["method"], r["bits"]): r for r in results["runs"]}


def _sg(x: float, nd: int = 1) -> str:
    """Signed number, never "-0.0"."""
    return f"{x + 0.0:+.{nd}f}"


def interval_text(d, nd: int = 2, unit: str = "") -> str:
    """'+0.42 [−0.10, +0.94] dB (inside the noise)' from an interval dict with a verdict."""
    if d is None:
        return "—"
    lo, hi = d.get("lo"), d.get("hi")
    rng = f" [{_sg(lo, nd)}, {_sg(hi, nd)}]" if lo is not None and hi is not None and math.isfinite(lo) \
        and math.isfinite(hi) else ""
    tail = f" ({d['verdict']})" if d.get("verdict") else ""
    return f"{_sg(d['mean'], nd)}{rng}{unit}{tail}"


ND = {"psnr_db": 2, "ssim": 4, "flicker_vs_fp": 4, "fd": 2, "adherence_all": 1, "rel_l2": 4}
UNIT = {"psnr_db": " dB", "adherence_all": " pts"}


def paired_diff(a, b, metric) -> Optional[dict]:
    iv = cmp.diff_interval(a, b, metric)
    return None if iv is None else {**iv.to_dict(), "verdict": verdict(iv, cmp.METRICS[metric][1])}


# ----------------------------------------------------------------------------- analysis
def analyse(results: dict) -> dict:
    """``results`` with "analysis" (paired comparisons, PSNR power) (re)computed."""
    comps = cmp.comparisons(results)
    results["analysis"] = {
        "intervals": "per-clip metrics: paired Student-t over prompts (same prompt and noise); FD: normal "
                     "bootstrap (± 1.96 SD) over seeded prompt resamples shared by all rows; 95 %",
        "comparisons": comps,
        "psnr_power": cmp.psnr_power(comps, results["meta"]["n_prompts"]),
    }
    return results


# ----------------------------------------------------------------------------- Markdown
STAT_COLUMNS = [  # (header, metric of dvdquant.eval.compare.METRICS, digits)
    ("PSNR vs FP dB ↑", "psnr_db", 2), ("SSIM vs FP ↑", "ssim", 4), ("flicker vs FP ↓", "flicker_vs_fp", 4),
    ("FD ↓", "fd", 2), ("adherence (all) ↑", "adherence_all", 1), ("rel. L2 ↓", "rel_l2", 4),
]
COLUMNS = [  # (header, getter, format): plain values
    ("avg A bits", lambda r: r.get("avg_act_bits"), "{:.2f}"),
    ("W err", lambda r: r["cost"]["mean_w_err"], "{:.4f}"),
    ("quant. s", lambda r: r["cost"]["quantize_seconds"], "{:.2f}"),
    ("calib. passes", lambda r: r["cost"]["calibration_passes"], "{:d}"),
]


def regenerate_command(meta: dict, out: Optional[str] = None, update_docs: bool = True) -> str:
    from .quality import BITS, DEFAULT_BATCH, DEFAULT_PROMPTS, FD_BOOTSTRAP, METHODS
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
    reps = (meta.get("fd_bootstrap") or {}).get("reps", FD_BOOTSTRAP)
    if reps != FD_BOOTSTRAP:
        parts.append(f"--fd-bootstrap {reps}")
    parts.append("--device cuda" if "CUDA" in meta["device"] else "--device cpu")
    if meta.get("layers"):
        parts.append("--layers")
    if out is not None or update_docs:
        parts.append(f"--out {out or 'eval_out'}")
    return " ".join(parts) + (f" && python {DOCS_SCRIPT} {out or 'eval_out'}" if update_docs else "")


def _provenance(meta: dict) -> str:
    run = (f"({meta['created']}; torch {meta['torch']}, diffusers {meta['diffusers']}; wall time "
           f"{meta['wall_seconds']:.0f} s)")
    parts = meta.get("parts")
    if not parts:
        return f"Generated by `{regenerate_command(meta)}` on **{meta['device']}** {run}."
    cmds = [f"`{regenerate_command({**meta, **p}, out=p['dir'], update_docs=False)}`" for p in parts]
    dirs = " ".join(p["dir"] for p in parts)
    return (f"Generated in {len(parts)} calls on **{meta['device']}**: " + "; ".join(cmds) + ", merged by "
            f"`dvdquant eval --from-results {dirs} --out {meta.get('merged_into', 'DIR')}` (then `python "
            f"{DOCS_SCRIPT}` on it) {run}.")


def _fmt(v, fmt) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else "−inf"
    return fmt.format(v)


def _stat_cell(row: dict, metric: str, nd: int) -> str:
    iv = cmp.row_interval(row, metric)
    if iv is None:
        v = row["metrics"]["adherence"]["all"] if metric == "adherence_all" else row["metrics"].get(metric)
        return _fmt(v, f"{{:.{nd}f}}")
    if not (math.isfinite(iv.lo) and math.isfinite(iv.hi)):
        return f"{iv.mean:.{nd}f}"
    return f"{iv.mean:.{nd}f} ± {iv.half_width:.{nd}f}"


def _table(results: dict) -> list[str]:
    head = ["Method", "W/A"] + [c[0] for c in STAT_COLUMNS] + [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fp = results["fp"]
    lines.append("| " + " | ".join([fp["label"], "FP"] + [_stat_cell(fp, m, nd) for _, m, nd in STAT_COLUMNS]
                                   + ["—"] * len(COLUMNS)) + " |")
    by_bits: dict = {}
    for r in results["runs"]:
        by_bits.setdefault(r["bits"], []).append(r)
    for bits, rows in by_bits.items():
        best = {m: cmp.significantly_best(rows, m) for _, m, _ in STAT_COLUMNS}
        for r in rows:
            cells = [r["label"], bits]
            for _, m, nd in STAT_COLUMNS:
                c = _stat_cell(r, m, nd)
                cells.append(f"**{c}**" if best[m] is r else c)
            cells += [_fmt(get(r), f) for _, get, f in COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _diff_cell(d: Optional[dict], nd: int) -> str:
    if d is None:
        return "—"
    mark = {"better": " ▲", "worse": " ▼"}.get(d["verdict"], "")
    return interval_text({k: v for k, v in d.items() if k != "verdict"}, nd) + mark


def _comparison_table(results: dict) -> list[str]:
    comps = results["analysis"]["comparisons"]
    if not comps:
        return []
    cols = [m for _, m, _ in STAT_COLUMNS if m != "rel_l2"]
    L = ["| A − B | W/A | " + " | ".join(f"Δ {cmp.METRICS[m][0]}" for m in cols) + " |",
         "|---|---|" + "---|" * len(cols)]
    for c in comps:
        L.append(f"| {cmp.pair_label(c)} | {c['bits']} | "
                 + " | ".join(_diff_cell(c["metrics"].get(m), ND[m]) for m in cols) + " |")
    return L


def _power_line(results: dict) -> list[str]:
    pw = results["analysis"].get("psnr_power")
    if not pw:
        return []
    reached = "reached" if pw["met"] else "**not reached**"
    return [f"Paired PSNR differences at n = {pw['n']} prompts: 95 % half-width {pw['half_width_min']:.2f}–"
            f"{pw['half_width_max']:.2f} dB (target ±{pw['target_half_width_db']} dB: {reached}). Per-prompt SD of "
            f"the differences: median {pw['sd_median']:.2f} dB, largest {pw['sd_max']:.2f} dB ({pw['sd_max_pair']}); "
            f"±{pw['target_half_width_db']} dB needs n ≈ (1.96·sd/{pw['target_half_width_db']})² ≈ "
            f"{pw['prompts_needed_median_sd']} prompts at the median SD, {pw['prompts_needed_max_sd']} at the largest."]


def render_markdown(results: dict, img_prefix: str = "img/", frames: bool = True) -> str:
    """The quality report in Markdown; ``frames``: whether the frame-grid image exists to be shown."""
    if "analysis" not in results:
        analyse(results)
    meta, fp = results["meta"], results["fp"]
    n = meta["n_prompts"]
    reps = (meta.get("fd_bootstrap") or {}).get("reps")
    L = ["## Quality: methods × bit-widths on the embedded model (issue #4)", "", _provenance(meta), ""]
    L.append(f"Model: {meta['model_description']}. {n} prompts from the fixed construction "
             f"`sample_combinations({n}, seed={meta['prompt_seed']})` (every shape, colour, motion and background "
             f"occurs; not tuned on results), {meta['steps']} Euler steps, CFG {meta['guidance']}, initial noise of "
             f"clip i seeded with {meta['seed']} + i and identical for every method, batches of "
             f"{meta['batch_size']} prompts (fixed: δ-GBS's indicator is taken over the batch). Quantized layers run "
             "the exact fp32 simulation of the integer pipeline (`backend=\"simulated\"`).")
    L += _dvdquant_config_lines(results["runs"])
    L += [""] + _table(results) + [""]
    L.append(
        "PSNR / SSIM vs FP: of each decoded clip against the FP clip with the same prompt and noise (PSNR capped "
        "at 100 dB), mean ± the 95 % Student-t half-width over prompts. Flicker vs FP: mean |Δ_t(q) − Δ_t(FP)| of "
        f"consecutive-frame changes (FP's own mean |Δ_t|: {fp['frame_consistency']:.4f}). FD: Fréchet distance in "
        f"the classifier's 256-d feature space to {meta['real_clips']} real generator clips of the same "
        f"combinations, ± 1.96 × the SD of its values on {reps} seeded bootstrap resamples of the prompts (sampling "
        f"floor, {n} other real clips: {meta['fd_real_floor']:.2f}). Adherence (secondary: it saturates): the "
        "evaluator classifier reads all four captioned factors (% of clips; one clip = "
        f"{100.0 / n:.2f} points; real clips: {meta['real_clip_adherence']['all']:.1f} %; per factor in "
        "results.json). Rel. L2: final sample vs FP. Avg A bits: mean activation bits over steps. W err: mean "
        "relative weight error ‖W − Ŵ‖/‖W‖ over layers (in the rotated basis where rotated). Quant. s: time of "
        "`quantize_` incl. calibration, on this device. Bold: best of its bit-width *and* better than every other "
        "row of that bit-width by a paired 95 % interval that excludes 0 (none bold: the best is inside the noise).")
    L += ["", "W4A6 is δ-GBS for DVD-Quant and its ablations (A4/A8 per step chosen by δ, `DVDQuantConfig()`'s "
          "`gbs` or `GBSConfig()`'s defaults) and static 6-bit activations for the baselines. "
          "“DVD-Quant − δ-GBS (static A4)” is the W4A6 configuration with δ-GBS off: every step A4 (the same "
          "numerics as DVD-Quant W4A4). Ablations replace one field of `DVDQuantConfig()`: `bgr=None` (MinMax "
          "weights), `rotation=False`, `auto_scale=\"none\"`."]
    L += ["", f"`python {DOCS_SCRIPT} DIR` writes this section (with the acceptance checks), `docs/results.json` "
          "and `docs/img/quality_*.png` from a run folder. A run split across calls (the same `--prompts`, `--steps`, "
          "`--seed`, other `--methods` / `--bits` into separate `--out` folders) is merged first with "
          "`dvdquant eval --from-results DIR [DIR ...] --out DIR`."]
    exact = "bit-identical" if fp["rerun_exact"] else "**not** bit-identical (non-deterministic kernels)"
    L += ["", f"FP row: a second FP generation compared with the first, {exact}."]
    if meta.get("fp_identical_across_parts") is False:
        L.append("**The FP clips differ between the merged calls**: rows of different calls are compared with "
                 "different FP references.")
    comp = _comparison_table(results)
    if comp:
        L += ["", "### Paired differences (95 % intervals)", "",
              "A − B over the same prompts and noise: mean [95 % interval]; Student-t over prompts, FD by the "
              "bootstrap above (the same resamples for every row). ▲: A better, ▼: A worse, both only when the "
              "interval excludes 0; unmarked: inside the noise. Adherence in points.", ""] + comp
        L += [""] + _power_line(results)
    notes = _observations(results) + _notes(results)
    if notes:
        L += [""] + [f"- {x}" for x in notes]

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
        bits = list(meta["bits"])
        labels = list(dict.fromkeys(r["label"] for r in results["runs"]))
        idx = {(r["label"], r["bits"]): r for r in results["runs"]}
        L += ["| Method | " + " | ".join(bits) + " |", "|---|" + "---|" * len(bits)]
        for lab in labels:
            vals = [idx.get((lab, b), {}).get("layer_sqnr_mean_db") for b in bits]
            L.append(f"| {lab} | " + " | ".join(_fmt(v, "{:.1f}") for v in vals) + " |")
        L += ["", "Output of each QuantLinear vs `F.linear` with the original FP weight on the same (real) input, "
              "per step; per-layer, per-step tables in `results_layers.json`.", "",
              f"![per-layer SQNR at W4A4]({img_prefix}{IMG_SQNR})"]
    if frames:
        L += ["", f"![frames, FP vs each method at W4A4]({img_prefix}{IMG_FRAMES})"]
    L.append("")

    return "\n".join(L) + "\n"


def _observations(results) -> list[str]:
    """Facts read off the numbers (regenerated with them, never hand-written)."""
    out = []
    runs = results["runs"]
    by_bits: dict = {}
    for r in runs:
        by_bits.setdefault(r["bits"], []).append(r)
    if not runs:
        return out
    psnr = {b: sum(r["metrics"]["psnr_db"] for r in rs) / len(rs) for b, rs in by_bits.items()}
    out.append("Mean PSNR over the rows of each bit-width: " + ", ".join(f"{b} {v:.1f} dB" for b, v in psnr.items())
               + ".")
    low = [r for r in runs if r["bits"] != "W8A8"]
    if low:
        a = [r["metrics"]["adherence"]["all"] for r in low]
        one = 100.0 / results["meta"]["n_prompts"]
        out.append(f"All-factor adherence of every W4 row lies in {min(a):.1f}–{max(a):.1f} % "
                   f"(FP {results['fp']['adherence']['all']:.1f} %), a spread of {round((max(a) - min(a)) / one)} "
                   "clips: on this model the classifier separates the methods far less than PSNR / SSIM / flicker "
                   "do, so it is a secondary column.")
    idx = index_runs(results)
    d, nb = idx.get(("dvdquant", "W4A4")), idx.get(("dvdquant-no-bgr", "W4A4"))
    if d and nb:
        out.append(f"BGR at W4A4: mean weight error {d['cost']['mean_w_err']:.4f} vs {nb['cost']['mean_w_err']:.4f} "
                   f"with MinMax weights; PSNR of the decoded clip vs the FP clip (same prompt and noise) "
                   f"{d['metrics']['psnr_db']:.2f} vs {nb['metrics']['psnr_db']:.2f} dB.")
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
        out.append(f"**Incomplete run** ({results['meta']['incomplete']}): rows missing (run them in another call "
                   "and merge with `--from-results`).")
    for f in results.get("failed", []):
        out.append(f"{f['method']} at {f['bits']} failed and is missing from the table: {f['error']}")
    if "random" in results["meta"]["model"]:
        out.append("Random-init model and classifier: a development run, the numbers mean nothing.")
    return out


# ----------------------------------------------------------------------------- files
def write_outputs(results: dict, out_dir, layers: Optional[dict] = None, grid: Optional[dict] = None) -> Path:
    """results.json (with intervals), layers.json, grid.pt, quality.md, quality_*.png into ``out_dir``."""
    from . import plots
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "analysis" not in results:
        analyse(results)
    store.dump({k: v for k, v in results.items() if k != "layers"}, out / store.RESULTS)
    if layers:
        store.dump(layers, out / store.LAYERS, 3)
        plots.sqnr_plot(results, layers, out / IMG_SQNR)
    if any(r.get("gbs") for r in results["runs"]):
        plots.gbs_plot(results, out / IMG_GBS)
    if grid:
        store.save_grid(grid, out / store.GRID)
        plots.frame_grid(grid, out / IMG_FRAMES)
    (out / "quality.md").write_text(render_markdown(results, img_prefix="", frames=bool(grid)))
    return out


def finish(run_dirs: Sequence, out_dir=None) -> dict:
    """Merge run folders (one, or the parts of a split run), analyse, write the report into ``out_dir``.

    ``out_dir`` defaults to the single run folder; a merge of several needs it. Returns the results.
    """
    from .quality import BITS, METHODS
    run_dirs = [Path(d) for d in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    if out_dir is None:
        if len(run_dirs) != 1:
            raise DVDQuantError("merging several run folders needs an output folder (--out)")
        out_dir = run_dirs[0]
    results, layers, grid = store.merge_runs(run_dirs, list(METHODS), list(BITS))
    if len(run_dirs) > 1:
        results["meta"]["merged_into"] = str(out_dir)
    analyse(results)
    write_outputs(results, out_dir, layers, grid)
    return results


def load_results(run_dir) -> dict:
    """A run folder's results (results.partial.json of a run cut short), intervals recomputed."""
    results, _, _ = store.merge_runs([run_dir])
    return analyse(results)


_BITS_FIELDS = ("w_bits", "a_bits", "gbs", "skip")


def _dvdquant_config_lines(runs) -> list:
    """The DVD-Quant rows' configuration: the first row's fields, then any field another row sets otherwise
    (parts of a merged run measured with different defaults)."""
    rows = [r for r in runs if r["method"] == "dvdquant"]
    if not rows:
        return []
    first = {k: v for k, v in rows[0]["config"]["fields"].items() if k not in _BITS_FIELDS}
    text = (f"“DVD-Quant” is `DVDQuantConfig()` with the bit-widths set; its {rows[0]['bits']} row: "
            + ", ".join(f"`{k}={v}`" for k, v in first.items()) + ".")
    for r in rows[1:]:
        diff = {k: v for k, v in r["config"]["fields"].items() if k not in _BITS_FIELDS and first.get(k) != v}
        if diff:
            text += f" Its {r['bits']} row: " + ", ".join(f"`{k}={v}`" for k, v in diff.items()) + "."
    return ["", text]
