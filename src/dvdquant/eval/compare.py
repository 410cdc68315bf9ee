"""Intervals of an evaluation's rows and paired differences between rows (95 %).

Per-clip metrics (PSNR / SSIM / flicker / rel. L2 vs the FP clip of the same prompt and noise,
adherence per clip) get Student-t intervals: of a row's mean, and of the mean of per-prompt
differences between two rows (paired over prompt + noise). The Fréchet distance gets normal
bootstrap intervals (± 1.96 · SD of the replicates) over prompt resamples that every row shares
(seeded), of the row's FD and of FD_A − FD_B. A difference counts as a win or a loss only when its interval excludes 0.

:func:`comparisons` pairs DVD-Quant with each baseline at each bit-width, and each ablation or
variant with DVD-Quant at its bit-width ("A − B": the first named minus the second).
"""
from __future__ import annotations

import statistics
from typing import Optional

from .stats import Interval, bootstrap_interval, mean_interval, paired_interval, prompts_needed, verdict

# key -> (label, higher is better, scale of a per-clip value)
METRICS = {
    "psnr_db": ("PSNR vs FP (dB)", True),
    "ssim": ("SSIM vs FP", True),
    "flicker_vs_fp": ("flicker vs FP", False),
    "fd": ("FD", False),
    "adherence_all": ("adherence, all factors (points)", True),
    "rel_l2": ("rel. L2 of the final sample", False),
}
HEADLINE = ("psnr_db", "ssim", "flicker_vs_fp", "fd")
TARGET_HALF_WIDTH_DB = 0.3


def key(row: dict) -> str:
    return f"{row['method']}@{row['bits']}"


def clip_values(row: dict, metric: str) -> Optional[list]:
    """Per-prompt values of a per-clip metric (adherence in points: 0 or 100), None if not stored."""
    pc = row.get("per_clip")
    if pc is None:
        return None
    if metric == "adherence_all":
        return [100.0 * x for x in pc["correct"]["all"]]
    return pc.get(metric)


def row_interval(row: dict, metric: str) -> Optional[Interval]:
    """Interval of a row's mean (t) or, for "fd", of its FD (bootstrap); None without per-clip data."""
    if metric == "fd":
        reps, point = row.get("fd_bootstrap"), row["metrics"].get("fd")
        if not reps or point is None:
            return None
        return bootstrap_interval(point, [x for x in reps if x is not None], len(clip_values(row, "psnr_db") or []))
    v = clip_values(row, metric)
    return mean_interval(v) if v is not None else None


def diff_interval(a: dict, b: dict, metric: str) -> Optional[Interval]:
    """Interval of a − b, paired over prompts (t) or over shared prompt resamples (FD, bootstrap)."""
    if metric == "fd":
        ra, rb = a.get("fd_bootstrap"), b.get("fd_bootstrap")
        fa, fb = a["metrics"].get("fd"), b["metrics"].get("fd")
        if not ra or not rb or len(ra) != len(rb) or fa is None or fb is None:
            return None
        n = len(clip_values(a, "psnr_db") or [])
        return bootstrap_interval(fa - fb, [x - y for x, y in zip(ra, rb) if x is not None and y is not None], n)
    va, vb = clip_values(a, metric), clip_values(b, metric)
    return paired_interval(va, vb) if va is not None and vb is not None else None


def difference(a: dict, b: dict, metrics=tuple(METRICS)) -> dict:
    """{metric: interval dict + "verdict" (for a: better / worse / inside the noise)}."""
    out = {}
    for m in metrics:
        iv = diff_interval(a, b, m)
        if iv is not None:
            out[m] = {**iv.to_dict(), "verdict": verdict(iv, METRICS[m][1])}
    return out


def comparisons(results: dict) -> list[dict]:
    """DVD-Quant − each baseline, and each ablation / variant − DVD-Quant, at every bit-width."""
    idx = {(r["method"], r["bits"]): r for r in results["runs"]}
    out = []
    for r in results["runs"]:
        d = idx.get(("dvdquant", r["bits"]))
        if d is None or r is d or r["family"] not in ("baseline", "ablation", "variant"):
            continue
        a, b = (d, r) if r["family"] == "baseline" else (r, d)
        out.append({"a": key(a), "b": key(b), "a_label": a["label"], "b_label": b["label"], "bits": r["bits"],
                    "kind": r["family"], "ablates": r.get("ablates", ""), "metrics": difference(a, b)})
    return out


def pair_label(c: dict) -> str:
    """'A − B' of a comparison, labels with a sign of their own in parentheses."""
    par = [f"({x})" if any(ch in x for ch in "−+") else x for x in (c["a_label"], c["b_label"])]
    return f"{par[0]} − {par[1]}"


def significantly_best(rows: list[dict], metric: str) -> Optional[dict]:
    """The row with the best mean if its difference to every other row excludes 0, else None."""
    if len(rows) < 2:
        return None
    hib = METRICS[metric][1]
    vals = [(row_interval(r, metric), r) for r in rows]
    vals = [(iv.mean, r) for iv, r in vals if iv is not None]
    if len(vals) < len(rows):
        return None
    best = (max if hib else min)(vals, key=lambda t: t[0])[1]
    for r in rows:
        if r is not best:
            iv = diff_interval(best, r, metric)
            if iv is None or verdict(iv, hib) != "better":
                return None
    return best


def psnr_power(comps: list[dict], n: int) -> Optional[dict]:
    """Half-widths reached by the paired PSNR differences, and prompts needed for ±0.3 dB."""
    ivs = [c["metrics"]["psnr_db"] for c in comps if "psnr_db" in c["metrics"] and c["metrics"]["psnr_db"]["sd"]]
    if not ivs:
        return None
    sds = [iv["sd"] for iv in ivs]
    hws = [iv["half_width"] for iv in ivs]
    worst = max(ivs, key=lambda iv: iv["sd"])
    wc = next(c for c in comps if c["metrics"].get("psnr_db") is worst)
    return {"n": n, "target_half_width_db": TARGET_HALF_WIDTH_DB, "half_width_min": min(hws),
            "half_width_max": max(hws), "sd_max": worst["sd"], "sd_max_pair": f"{pair_label(wc)} {wc['bits']}",
            "sd_median": statistics.median(sds),
            "prompts_needed_max_sd": prompts_needed(worst["sd"], TARGET_HALF_WIDTH_DB),
            "prompts_needed_median_sd": prompts_needed(statistics.median(sds), TARGET_HALF_WIDTH_DB),
            "met": max(hws) <= TARGET_HALF_WIDTH_DB}
