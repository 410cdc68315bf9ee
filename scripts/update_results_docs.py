"""Install a finished quality evaluation into the repository's docs/, with the acceptance checks of issue #4.

    dvdquant eval --layers --out eval_out                  # the library: eval_out/results.json, quality.md, plots
    python scripts/update_results_docs.py eval_out         # → docs/RESULTS.md (quality section), docs/results.json,
                                                           #   docs/results_layers.json, docs/img/quality_*.png

The quality section is the library's report (:func:`dvdquant.eval.report.render_markdown`) followed by the
acceptance checks: the targets issue #4 set for this evaluation (DVD-Quant above every baseline, within x
points of FP adherence, each ablation losing something). A check of a difference passes only when its
paired 95 % interval excludes 0; a "within x points" check only when the interval's upper end is within x.
The section replaces the text between ``<!-- BEGIN quality -->`` / ``<!-- END quality -->`` of RESULTS.md
(other sections untouched; markers appended if absent). These are the repository's bookkeeping, not part of
the library. A run split across calls is merged first: ``dvdquant eval --from-results DIR ... --out DIR``.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Sequence

from dvdquant.data import FACTOR_NAMES
from dvdquant.eval import compare as cmp
from dvdquant.eval import plots, store
from dvdquant.eval import report as rp
from dvdquant.eval.stats import paired_interval

DOCS = Path(__file__).resolve().parents[1] / "docs"
BEGIN, END = "<!-- BEGIN quality -->", "<!-- END quality -->"
WEAK_BASELINES = ("minmax", "smoothquant", "quarot")
HEADLINE_BITS = ("W4A4", "W4A6", "W4A8")
ABLATION_CHECKS = {"dvdquant-no-bgr": "W4A4", "dvdquant-no-rotation": "W4A4", "dvdquant-no-autoscale": "W4A4",
                   "dvdquant-no-gbs": "W4A6"}   # ablation -> bit-width where it must lose something


# ----------------------------------------------------------------------------- acceptance
def _vs_baselines(add, idx, bits: str, metrics: Sequence[str], name: str) -> None:
    """One check: DVD-Quant better than every baseline at ``bits`` in every metric (intervals exclude 0)."""
    dvd = idx.get(("dvdquant", bits))
    base = [idx[(m, bits)] for m in rp.BASELINES if (m, bits) in idx]
    if dvd is None or not base:
        return
    ok, parts = True, []
    for r in base:
        ds = {m: rp.paired_diff(dvd, r, m) for m in metrics}
        ok &= all(d is not None and d["verdict"] == "better" for d in ds.values())
        parts.append(f"vs {r['label']}: " + ", ".join(
            f"{cmp.METRICS[m][0].split(' (')[0]} {rp.interval_text(d, rp.ND[m], rp.UNIT.get(m, ''))}"
            for m, d in ds.items()))
    add(name, ok, "; ".join(parts))


def _within_fp(row, fp_correct: dict, tol: float) -> tuple[bool, str]:
    """Adherence drop vs FP per factor (paired, points): passes when every upper bound ≤ tol."""
    parts, ok = [], True
    for k in list(FACTOR_NAMES) + ["all"]:
        iv = paired_interval([100.0 * x for x in fp_correct[k]], [100.0 * x for x in row["per_clip"]["correct"][k]])
        if k != "all":
            ok &= math.isfinite(iv.hi) and iv.hi <= tol + 1e-9
        parts.append(f"{k} {rp.interval_text(iv.to_dict(), 1)}")
    return ok, "drop vs FP (points, 95 % interval): " + ", ".join(parts)


def acceptance(results: dict) -> dict:
    """Checks of the issue's targets; each {"name", "ok" (True/False/None = not evaluated), "detail"}.

    A "better" / "loses something" check passes only when the paired 95 % interval excludes 0;
    a "within x points" check only when the interval's upper end is within x.
    """
    idx = rp.index_runs(results)
    checks: list = []

    def add(name, ok, detail):
        checks.append({"name": name, "ok": ok, "detail": detail})

    if not all("per_clip" in r for r in results["runs"]):
        add("per-clip metrics present (intervals need them)", False, "results.json predates per-clip metrics")
        return {"checks": checks, "ablation_losses": [], "most_important_part_w4a4": None}
    for b in HEADLINE_BITS:
        _vs_baselines(add, idx, b, ("psnr_db",),
                      f"{b}: DVD-Quant has a higher clip PSNR vs FP than every baseline (paired 95 % interval "
                      "excludes 0)")
    _vs_baselines(add, idx, "W4A4", ("ssim", "flicker_vs_fp", "fd"),
                  "W4A4: DVD-Quant beats every baseline in SSIM, flicker and FD too (intervals exclude 0)")
    _vs_baselines(add, idx, "W4A4", ("adherence_all",),
                  "W4A4: DVD-Quant has a higher all-factor adherence than every baseline (secondary metric)")
    fp_correct = results["fp"]["reference"]["correct"]
    for b, tol in (("W4A4", 3.0), ("W4A8", 1.0), ("W4A6", 1.0)):
        r = idx.get(("dvdquant", b))
        if r is not None:
            ok, detail = _within_fp(r, fp_correct, tol)
            add(f"{b}: DVD-Quant within {tol:g} point{'s' if tol != 1 else ''} of FP adherence on every factor "
                "(upper end of the interval)", ok, detail)
    dvd = idx.get(("dvdquant", "W4A4"))
    if dvd is not None:
        gaps, clear = [], True
        for m in WEAK_BASELINES:
            r = idx.get((m, "W4A4"))
            if r is not None:
                d = rp.paired_diff(dvd, r, "psnr_db")
                clear &= d["verdict"] == "better" and d["mean"] >= 1.0
                gaps.append(f"DVD-Quant − {r['label']}: PSNR {rp.interval_text(d, 2, ' dB')}")
        if gaps:
            add("W4A4: MinMax / SmoothQuant / QuaRot clearly worse (PSNR ≥ 1 dB below DVD-Quant, interval "
                "excludes 0)", clear, "; ".join(gaps))

    with_attn, no_attn = idx.get(("dvdquant", "W4A8")), idx.get(("dvdquant-no-qattn", "W4A8"))
    attention = with_attn is not None and with_attn["config"]["fields"].get("attention", "none") != "none"
    if attention and no_attn is not None:
        ds = {k: paired_interval([100.0 * x for x in with_attn["per_clip"]["correct"][k]],
                                 [100.0 * x for x in no_attn["per_clip"]["correct"][k]]).to_dict()
              for k in list(FACTOR_NAMES) + ["all"]}
        add("W4A8: with 8-bit attention within 1 point of W4A8 without it (issue #6; lower end of the interval)",
            all(math.isfinite(d["lo"]) and d["lo"] >= -1.0 - 1e-9 for d in ds.values()),
            "adherence with − without (points): " + ", ".join(f"{k} {rp.interval_text(d, 1)}" for k, d in ds.items())
            + f"; PSNR {rp.interval_text(rp.paired_diff(with_attn, no_attn, 'psnr_db'), 2, ' dB')}")

    losses = []
    for akey, bits in ABLATION_CHECKS.items():
        a, ref = idx.get((akey, bits)), idx.get(("dvdquant", bits))
        if a is None or ref is None:
            continue
        drop = {m: rp.paired_diff(ref, a, m) for m in cmp.METRICS}     # DVD-Quant − ablation: "better" = a loss
        losses.append({"ablation": a["ablates"], "bits": bits, "with_minus_without": drop})
        p = drop["psnr_db"]
        note = {"better": "", "worse": " — removing it is better (interval excludes 0)",
                "inside the noise": " — inside the noise"}.get(p["verdict"], "")
        add(f"{bits}: removing {a['ablates']} lowers clip PSNR vs FP (interval excludes 0)",
            p["verdict"] == "better",
            "with − without: " + ", ".join(
                f"{cmp.METRICS[m][0].split(' (')[0]} {rp.interval_text(d, rp.ND[m], rp.UNIT.get(m, ''))}"
                for m, d in drop.items() if d is not None and m != "rel_l2") + note)
    most = None
    w4 = [x for x in losses if x["bits"] == "W4A4"]
    if w4:
        m = max(w4, key=lambda x: x["with_minus_without"]["psnr_db"]["mean"])
        most = {"part": m["ablation"], "psnr": m["with_minus_without"]["psnr_db"]}
    return {"checks": checks, "ablation_losses": losses, "most_important_part_w4a4": most}


def render_acceptance(acc: dict) -> str:
    """The Markdown of :func:`acceptance`'s checks."""
    L = ["### Acceptance (issue #4), checked on these numbers", "",
         "A check of a difference passes only when its paired 95 % interval excludes 0.", ""]
    for c in acc["checks"]:
        mark = "✅" if c["ok"] else ("❌" if c["ok"] is False else "—")
        L.append(f"- {mark} {c['name']}: {c['detail']}")
    m = acc.get("most_important_part_w4a4")
    if m:
        L.append(f"- Part whose removal costs the most PSNR at W4A4: **{m['part']}** (with − without: "
                 f"{rp.interval_text(m['psnr'], 2, ' dB')}). δ-GBS is judged at W4A6 against static A4 (above).")
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- docs/
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


def install_docs(run_dir, docs_dir=None) -> list[Path]:
    """Install a finished report (a folder written by ``dvdquant eval``) into ``docs_dir`` (the repository's
    docs/ by default), the acceptance checks included; returns the files written."""
    run_dir = Path(run_dir)
    docs = Path(docs_dir) if docs_dir is not None else DOCS
    img = docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    results = rp.load_results(run_dir)
    results["acceptance"] = acceptance(results)
    written = []
    layers_path = run_dir / store.LAYERS
    if layers_path.exists():
        layers = json.loads(layers_path.read_text())
        shutil.copyfile(layers_path, docs / "results_layers.json")
        plots.sqnr_plot(results, layers, img / rp.IMG_SQNR)
        written += [docs / "results_layers.json", img / rp.IMG_SQNR]
    if any(r.get("gbs") for r in results["runs"]):
        plots.gbs_plot(results, img / rp.IMG_GBS)
        written.append(img / rp.IMG_GBS)
    else:
        (img / rp.IMG_GBS).unlink(missing_ok=True)            # no δ-GBS rows: no stale plot of another run
    grid = store.load_grid(run_dir)
    frames = True
    if grid:
        plots.frame_grid(grid, img / rp.IMG_FRAMES)
        written.append(img / rp.IMG_FRAMES)
    elif (run_dir / rp.IMG_FRAMES).exists():
        shutil.copyfile(run_dir / rp.IMG_FRAMES, img / rp.IMG_FRAMES)
        written.append(img / rp.IMG_FRAMES)
    else:                                                     # a merged run without its clips: no frames
        (img / rp.IMG_FRAMES).unlink(missing_ok=True)
        frames = False
    store.dump(results, docs / "results.json")
    section = rp.render_markdown(results, img_prefix="img/", frames=frames) + render_acceptance(results["acceptance"])
    update_results_md(docs / "RESULTS.md", section)
    return written + [docs / "results.json", docs / "RESULTS.md"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a finished run folder of `dvdquant eval` (one, or the --out of a merge)")
    ap.add_argument("--docs", default=str(DOCS), help="the docs folder to write into (default: the repository's)")
    args = ap.parse_args(argv)
    written = install_docs(args.run_dir, args.docs)
    print("updated " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
