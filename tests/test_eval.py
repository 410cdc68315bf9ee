"""dvdquant.eval.evaluate on the shipped embedded model: report structure and the exact FP row (CPU)."""
import json

import pytest
import torch

from dvdquant.data import FACTOR_NAMES
from dvdquant.errors import CheckpointError
from dvdquant.numerics.video_metrics import PSNR_CAP
from repo_scripts import load

docs_script = load("update_results_docs")    # docs/ installation and the acceptance checks (scripts/)

N, REPS = 3, 20      # prompts, FD bootstrap resamples


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from dvdquant.models.embedded import load_embedded
    from dvdquant.eval.classifier import load_classifier
    try:
        load_embedded()
        load_classifier()
    except CheckpointError as e:
        pytest.skip(f"embedded model / classifier assets missing: {e}")
    from dvdquant.eval import evaluate
    from dvdquant.eval.report import finish
    out = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    evaluate("embedded", methods=["minmax", "dvdquant"], bits=["W4A4"], prompts=N, steps=2, seed=0, device="cpu",
             out_dir=out, layers=True, batch_size=N, guidance=1.0, fd_bootstrap=REPS, progress=False)
    return finish([out]), out


def test_structure(evaluated):
    res, out = evaluated
    # guidance=1.0 (no CFG) halves the CPU time; the GPU report runs CFG 4.0
    assert res["meta"]["n_prompts"] == N and res["meta"]["steps"] == 2
    assert res["meta"]["fd_bootstrap"]["reps"] == REPS and len(res["meta"]["fp_sha256"]) == 16
    assert [(r["method"], r["bits"]) for r in res["runs"]] == [("minmax", "W4A4"), ("dvdquant", "W4A4")]
    for r in res["runs"]:
        m = r["metrics"]
        assert set(m["adherence"]) == set(FACTOR_NAMES) | {"all"}
        assert 0 < m["psnr_db"] < PSNR_CAP and 0 < m["ssim"] <= 1 and m["rel_l2"] > 0
        assert m["fd"] >= 0 and m["flicker_vs_fp"] > 0
        pc = r["per_clip"]                                   # every clip's value, not only the mean
        for k in ("psnr_db", "ssim", "rel_l2", "flicker_vs_fp", "frame_consistency"):
            assert len(pc[k]) == N and sum(pc[k]) / N == pytest.approx(m[k], rel=1e-5, abs=1e-6), k   # both rounded to 6 places
        assert min(pc["psnr_db"]) == pytest.approx(m["psnr_db_min"], rel=1e-6)
        assert set(pc["correct"]) == set(FACTOR_NAMES) | {"all"} and all(len(v) == N for v in pc["correct"].values())
        assert 100 * sum(pc["correct"]["all"]) / N == pytest.approx(m["adherence"]["all"], abs=1e-3)
        assert len(r["fd_bootstrap"]) == REPS
        assert r["cost"]["calibration_passes"] == 0 and r["cost"]["quantize_seconds"] > 0
        assert r["avg_act_bits"] == 4.0 and r["gbs"] is None
        assert r["layer_sqnr_mean_db"] is not None
    (comp,) = res["analysis"]["comparisons"]
    assert (comp["a"], comp["b"]) == ("dvdquant@W4A4", "minmax@W4A4")
    psnr = comp["metrics"]["psnr_db"]
    assert psnr["n"] == N and psnr["lo"] < psnr["mean"] < psnr["hi"] and psnr["method"] == "t"
    assert comp["metrics"]["fd"]["method"] == "bootstrap"
    assert res["analysis"]["psnr_power"]["prompts_needed_max_sd"] >= 2
    assert "acceptance" not in res                           # the repository's checks live in scripts/
    names = [c["name"] for c in docs_script.acceptance(res)["checks"]]
    assert any("higher clip PSNR" in n for n in names)
    for f in ("results.json", "layers.json", "grid.pt", "quality.md", "quality_sqnr_w4a4.png",
              "quality_frames_w4a4.png"):
        assert (out / f).is_file(), f
    assert not (out / "results.partial.json").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["fp"]["rerun_exact"] is True and len(saved["runs"]) == 2 and "analysis" in saved
    md = (out / "quality.md").read_text()
    assert "Paired differences" in md and "±0.3 dB needs n" in md and "final-sample" not in md


def test_fp_row_exact(evaluated):
    res, _ = evaluated
    fp = res["fp"]
    assert fp["rerun_exact"]
    m = fp["metrics"]
    assert m["psnr_db"] == PSNR_CAP and m["ssim"] == pytest.approx(1.0) and m["rel_l2"] == 0.0
    assert m["flicker_vs_fp"] == 0.0 and fp["per_clip"]["psnr_db"] == [PSNR_CAP] * N
    assert m["adherence"] == fp["adherence"]
    assert all(v == 0.0 for v in m["adherence_drop"].values())
    assert m["fd"] == pytest.approx(fp["fd"])


def test_docs_section_and_cli(evaluated, tmp_path):
    from dvdquant import cli
    BEGIN, END, install_docs = docs_script.BEGIN, docs_script.END, docs_script.install_docs
    _, out = evaluated
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "RESULTS.md").write_text("# Results\n\n<!-- BEGIN speed -->\nkeep me\n<!-- END speed -->\n")
    install_docs(out, docs)
    install_docs(out, docs)                                  # idempotent: one quality section
    text = (docs / "RESULTS.md").read_text()
    assert "keep me" in text and text.count(BEGIN) == 1 and text.count(END) == 1
    assert "| FP (fp32) | FP | 100.00 ± 0.00 |" in text and "dvdquant eval" in text
    assert "### Acceptance (issue #4)" in text and "higher clip PSNR" in text
    assert "acceptance" in json.loads((docs / "results.json").read_text())
    assert docs_script.main([str(out), "--docs", str(docs)]) == 0 and text == (docs / "RESULTS.md").read_text()
    assert (docs / "results.json").is_file() and (docs / "img" / "quality_sqnr_w4a4.png").is_file()
    assert cli.main(["eval", "--from-results", str(out)]) == 0


def test_merge_of_a_split_run(evaluated, tmp_path):
    """The rows written by one call, split into two folders as two calls would, merge to the same report."""
    from dvdquant import cli
    from dvdquant.eval import store
    from dvdquant.eval.report import finish
    res, out = evaluated
    raw = json.loads((out / "results.json").read_text())
    for i, name in enumerate(("part1", "part2")):
        d = tmp_path / name
        d.mkdir()
        row = raw["runs"][i]
        store.dump({**raw, "meta": {**raw["meta"], "methods": [row["method"]]}, "runs": [row]}, d / "results.json")
    merged = finish([tmp_path / "part2", tmp_path / "part1"], tmp_path / "merged")
    assert [r["method"] for r in merged["runs"]] == ["minmax", "dvdquant"]
    assert store.json_safe(merged["analysis"]["comparisons"]) == store.json_safe(res["analysis"]["comparisons"])
    assert ([c["ok"] for c in docs_script.acceptance(merged)["checks"]]
            == [c["ok"] for c in docs_script.acceptance(res)["checks"]])
    md = (tmp_path / "merged" / "quality.md").read_text()
    assert "Generated in 2 calls" in md and "--from-results" in md
    assert cli.main(["eval", "--from-results", str(tmp_path / "part1"), str(tmp_path / "part2"),
                     "--out", str(tmp_path / "m2"), "--quiet"]) == 0
    assert cli.main(["eval", "--from-results", str(tmp_path / "part1"), str(tmp_path / "part1"),
                     "--out", str(tmp_path / "m3")]) == 2
