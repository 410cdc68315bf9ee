"""Statistics of the evaluation: t intervals, bootstrap, Fréchet distance, paired checks, merging (CPU, fast)."""
import json
import math
import random

import pytest
import torch

from dvdquant.errors import DVDQuantError
from dvdquant.eval import compare as cmp
from dvdquant.eval import report, store
from repo_scripts import load

docs_script = load("update_results_docs")    # the acceptance checks of issue #4 (scripts/)
from dvdquant.eval.frechet import FrechetBootstrap, frechet_distance, frechet_distance_reference
from dvdquant.eval.stats import (bootstrap_indices, bootstrap_interval, mean_interval, normal_quantile,
                                 paired_interval, percentile_interval, prompts_needed, t_quantile, verdict)


# ----------------------------------------------------------------------------- stats
@pytest.mark.parametrize("df,q", [(1, 12.706204736), (2, 4.302652730), (5, 2.570581836), (10, 2.228138852),
                                  (30, 2.042272456), (119, 1.980099876), (10 ** 7, 1.959964)])
def test_t_quantile_matches_tables(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, rel=1e-6)


def test_paired_interval_known_values():
    iv = paired_interval([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])       # differences 1..5
    assert iv.mean == 3.0 and iv.n == 5 and iv.sd == pytest.approx(math.sqrt(2.5))
    assert iv.half_width == pytest.approx(2.776445105 * math.sqrt(2.5) / math.sqrt(5), rel=1e-8)
    assert verdict(iv) == "better" and verdict(iv, higher_is_better=False) == "worse"
    flat = paired_interval([1, 2, 3], [1, 2, 3])
    assert (flat.lo, flat.hi) == (0.0, 0.0) and verdict(flat) == "inside the noise"   # zero is never a win
    assert verdict(paired_interval([1.0], [0.0])) == "not enough prompts"
    with pytest.raises(ValueError):
        paired_interval([1, 2], [1])


def test_interval_coverage_and_prompts_needed():
    rng = random.Random(0)
    hits = 0
    for _ in range(1000):
        iv = mean_interval([rng.gauss(0.5, 2.0) for _ in range(12)])
        hits += iv.lo <= 0.5 <= iv.hi
    assert 0.93 <= hits / 1000 <= 0.97
    assert prompts_needed(3.0, 0.3) == math.ceil((1.959963984540054 * 10) ** 2)       # 385


def test_bootstrap_is_seeded():
    a, b = bootstrap_indices(7, 50, seed=3), bootstrap_indices(7, 50, seed=3)
    assert torch.equal(a, b) and a.shape == (50, 7) and int(a.max()) < 7
    assert not torch.equal(a, bootstrap_indices(7, 50, seed=4))
    iv = bootstrap_interval(10.0, [1.0, 3.0] * 50, n=7)                       # SD of the replicates ≈ 1.005
    assert iv.mean == 10.0 and iv.half_width == pytest.approx(1.959964 * math.sqrt(100 / 99), rel=1e-6)
    assert normal_quantile(0.975) == pytest.approx(1.959963985, rel=1e-9)
    iv = percentile_interval(1.0, [float(i) for i in range(101)], n=7)
    assert (iv.lo, iv.hi, iv.method) == (pytest.approx(2.5), pytest.approx(97.5), "bootstrap")


# ----------------------------------------------------------------------------- Fréchet distance
@pytest.mark.parametrize("na,nb", [(3, 12), (20, 80), (60, 240)])     # sample space, sample space, D-space
def test_frechet_fast_form_matches_reference(na, nb):
    g = torch.Generator().manual_seed(na)
    a, b = torch.randn(na, 64, generator=g) * 0.7 + 0.1, torch.randn(nb, 64, generator=g)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance_reference(a, b), rel=1e-6)
    assert frechet_distance(b, b) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("n,k,d", [(3, 4, 64), (20, 4, 16)])       # sample-space and D-space paths
def test_frechet_bootstrap_replicates_are_resampled_fds(n, k, d):
    g = torch.Generator().manual_seed(1)
    real, feats = torch.randn(k * n, d, generator=g), torch.randn(n, d, generator=g) + 0.3
    fb = FrechetBootstrap(real, n, reps=70, seed=5)
    reps = fb.replicates(feats)
    assert len(reps) == 70 and reps == FrechetBootstrap(real, n, reps=70, seed=5).replicates(feats)
    idx = bootstrap_indices(n, 70, 5)
    for r in (0, 69):
        ridx = torch.cat([idx[r] + j * n for j in range(k)])
        assert reps[r] == pytest.approx(frechet_distance_reference(feats[idx[r]], real[ridx]), rel=1e-6, abs=1e-9)
    assert fb.point(feats) == pytest.approx(frechet_distance_reference(feats, real), rel=1e-6)


# ----------------------------------------------------------------------------- paired checks (synthetic)
N = 40


def _row(method, bits, psnr, family="baseline", ablates="", fd=50.0, seed=0, spread=1.0, wobble=0.0):
    """A row whose per-clip values are psnr + seeded noise (+ ``wobble`` alternating in sign)."""
    rng = random.Random(seed)
    noise = [rng.gauss(0, spread) + (wobble if i % 2 else -wobble) for i in range(N)]
    clip = [psnr + e for e in noise]
    ssim = [0.6 + 0.01 * e for e in noise]
    return {"method": method, "bits": bits, "label": method, "family": family, "ablates": ablates,
            "config": {"fields": {"attention": "int8"}},
            "metrics": {"psnr_db": sum(clip) / N, "ssim": sum(ssim) / N, "fd": fd, "rel_l2": 0.3,
                        "flicker_vs_fp": 0.05, "frame_consistency": 0.06, "adherence": {"all": 95.0}},
            "per_clip": {"psnr_db": clip, "ssim": ssim, "rel_l2": [0.3] * N, "flicker_vs_fp": [0.05 - 0.001 * e
                                                                                          for e in noise],
                         "frame_consistency": [0.06] * N,
                         "correct": {k: [1] * N for k in ("shape", "colour", "motion", "background", "all")}},
            "fd_bootstrap": [fd + 0.1 * i for i in range(-50, 50)],
            "cost": {"mean_w_err": 0.1, "quantize_seconds": 1.0, "calibration_passes": 0}, "avg_act_bits": 4.0}


def _results(rows):
    fp_correct = {k: [1] * N for k in ("shape", "colour", "motion", "background", "all")}
    return {"meta": {"n_prompts": N, "prompts": [f"p{i}" for i in range(N)], "methods": [], "bits": ["W4A4"]},
            "fp": {"reference": {"correct": fp_correct}, "adherence": {"all": 100.0}}, "runs": rows, "failed": []}


def _check(acc, start):
    return next(c for c in acc["checks"] if c["name"].startswith(start))


def test_difference_inside_the_noise_is_not_a_win():
    # DVD-Quant 0.1 dB above MinMax, per-prompt differences ±3 dB: the interval crosses 0
    dvd = _row("dvdquant", "W4A4", 20.1, family="dvdquant", seed=1)
    mm = _row("minmax", "W4A4", 20.0, seed=1, wobble=3.0)
    acc = docs_script.acceptance(_results([mm, dvd]))
    c = _check(acc, "W4A4: DVD-Quant has a higher clip PSNR")
    assert c["ok"] is False and "inside the noise" in c["detail"]
    comp = cmp.comparisons(_results([mm, dvd]))
    assert comp[0]["a"] == "dvdquant@W4A4" and comp[0]["metrics"]["psnr_db"]["verdict"] == "inside the noise"
    assert cmp.significantly_best([mm, dvd], "psnr_db") is None


def test_clear_difference_passes_and_ablation_losses():
    dvd = _row("dvdquant", "W4A4", 21.0, family="dvdquant", seed=1, fd=40.0)
    mm = _row("minmax", "W4A4", 18.0, seed=1, fd=60.0)          # same noise: the paired difference is exact
    nobgr = _row("dvdquant-no-bgr", "W4A4", 21.05, family="ablation", ablates="BGR", seed=7)
    norot = _row("dvdquant-no-rotation", "W4A4", 20.0, family="ablation", ablates="rotation", seed=1)
    res = _results([mm, dvd, nobgr, norot])
    acc = docs_script.acceptance(res)
    assert _check(acc, "W4A4: DVD-Quant has a higher clip PSNR")["ok"] is True
    assert _check(acc, "W4A4: MinMax / SmoothQuant / QuaRot clearly worse")["ok"] is True
    assert _check(acc, "W4A4: removing rotation")["ok"] is True
    bgr = _check(acc, "W4A4: removing BGR")
    assert bgr["ok"] is False and "inside the noise" in bgr["detail"]
    assert _check(acc, "W4A4: DVD-Quant within 3 points")["ok"] is True
    assert cmp.significantly_best([mm, dvd], "psnr_db") is dvd
    report.analyse(res)
    shown = {**res, "meta": {**res["meta"], "model": "embedded", "model_description": "x",
                             "device": "CPU", "created": "now", "torch": "t", "diffusers": "d",
                             "wall_seconds": 1.0, "prompt_seed": 0, "steps": 2, "seed": 0,
                             "guidance": 1.0, "batch_size": 40, "real_clips": 4 * N,
                             "fd_real_floor": 1.0, "real_clip_adherence": {"all": 100.0},
                             "fd_bootstrap": {"reps": 100}},
             "fp": {**dvd, "label": "FP (fp32)", "rerun_exact": True, "frame_consistency": 0.06,
                    "reference": res["fp"]["reference"], "adherence": {"all": 100.0}}}
    md = report.render_markdown(shown)
    assert "Paired differences" in md and "prompts at the median SD" in md and "final-sample" not in md
    assert report.IMG_FRAMES in md
    assert report.IMG_FRAMES not in report.render_markdown(shown, frames=False)    # a merged run without clips


# ----------------------------------------------------------------------------- merging split runs
def _write(d, res):
    d.mkdir()
    store.dump(res, d / store.RESULTS)
    return d


def test_merge_split_runs(tmp_path):
    dvd = _row("dvdquant", "W4A4", 21.0, family="dvdquant", seed=1)
    mm = _row("minmax", "W4A4", 18.0, seed=2)
    meta = {"model": "embedded", "n_prompts": N, "prompts": [f"p{i}" for i in range(N)], "steps": 2, "seed": 0,
            "device": "CPU", "created": "2026", "wall_seconds": 2.0, "fd_bootstrap": {"reps": 100, "seed": 1},
            "fp_sha256": "ab"}
    fp = {"reference": _results([])["fp"]["reference"], "rerun_exact": True}
    a = _write(tmp_path / "a", {"meta": {**meta, "methods": ["dvdquant"], "bits": ["W4A4"]}, "fp": fp,
                                "runs": [dvd], "failed": []})
    b = _write(tmp_path / "b", {"meta": {**meta, "methods": ["minmax"], "bits": ["W4A4"]}, "fp": fp,
                                "runs": [mm], "failed": []})
    merged, _, _ = store.merge_runs([a, b], ["minmax", "dvdquant"], ["W4A4"])
    assert [r["method"] for r in merged["runs"]] == ["minmax", "dvdquant"]          # canonical order
    assert merged["meta"]["methods"] == ["minmax", "dvdquant"] and merged["meta"]["wall_seconds"] == 4.0
    assert merged["meta"]["fp_identical_across_parts"] and len(merged["meta"]["parts"]) == 2
    assert json.loads(json.dumps(store.json_safe(merged)))["runs"][1]["per_clip"]["psnr_db"][0] == \
        pytest.approx(dvd["per_clip"]["psnr_db"][0])
    with pytest.raises(DVDQuantError, match="in both"):
        store.merge_runs([a, a])
    c = _write(tmp_path / "c", {"meta": {**meta, "steps": 3, "methods": ["quarot"], "bits": ["W4A4"]}, "fp": fp,
                                "runs": [], "failed": []})
    with pytest.raises(DVDQuantError, match="'steps' differs"):
        store.merge_runs([a, c])
    with pytest.raises(DVDQuantError, match="holds no results.json"):
        store.merge_runs([tmp_path / "nothing"])


def test_merge_lists_rows_not_run(tmp_path):
    meta = {"model": "embedded", "prompts": ["p"], "steps": 2, "device": "CPU", "created": "2026",
            "wall_seconds": 1.0, "methods": ["minmax", "quarot"], "bits": ["W4A4"],
            "planned": [["minmax", "W4A4"], ["quarot", "W4A4"]]}
    row = _row("minmax", "W4A4", 20.0)
    a = _write(tmp_path / "a", {"meta": {**meta, "incomplete": "1 of 2 runs done; not run: quarot W4A4"},
                                "fp": {}, "runs": [row], "failed": []})
    b = _write(tmp_path / "b", {"meta": {**meta, "methods": ["quarot"], "planned": [["quarot", "W4A4"]]}, "fp": {},
                                "runs": [], "failed": [{"method": "quarot", "bits": "W4A4", "error": "x"}]})
    merged, _, _ = store.merge_runs([a, b])
    assert "incomplete" not in merged["meta"] and len(merged["failed"]) == 1
    c = _write(tmp_path / "c", {"meta": {**meta, "methods": ["dvdquant"], "planned": [["dvdquant", "W4A4"]]},
                                "fp": {}, "runs": [], "failed": []})
    merged, _, _ = store.merge_runs([a, c])
    assert merged["meta"]["incomplete"] == "not run: quarot W4A4, dvdquant W4A4"
