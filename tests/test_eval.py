"""dvdquant.eval.evaluate on the shipped embedded model: report structure and the exact FP row (CPU)."""
import json

import pytest
import torch

from dvdquant.data import FACTOR_NAMES
from dvdquant.errors import CheckpointError
from dvdquant.numerics.video_metrics import PSNR_CAP


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
    out = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    res = evaluate("embedded", methods=["minmax", "dvdquant"], bits=["W4A4"], prompts=2, steps=2, seed=0,
                   device="cpu", out_dir=out, layers=True, batch_size=2, guidance=1.0, progress=False)
    return res, out


def test_structure(evaluated):
    res, out = evaluated
    # guidance=1.0 (no CFG) halves the CPU time; the GPU report runs CFG 4.0
    assert res["meta"]["n_prompts"] == 2 and res["meta"]["steps"] == 2
    assert [(r["method"], r["bits"]) for r in res["runs"]] == [("minmax", "W4A4"), ("dvdquant", "W4A4")]
    for r in res["runs"]:
        m = r["metrics"]
        assert set(m["adherence"]) == set(FACTOR_NAMES) | {"all"}
        assert 0 < m["psnr_db"] < PSNR_CAP and 0 < m["ssim"] <= 1 and m["rel_l2"] > 0
        assert m["fd"] >= 0 and m["flicker_vs_fp"] > 0
        assert r["cost"]["calibration_passes"] == 0 and r["cost"]["quantize_seconds"] > 0
        assert r["avg_act_bits"] == 4.0 and r["gbs"] is None
        assert len(res["layers"][f"{r['method']}@W4A4"]["sqnr_db"][0]) == 2          # per step
        assert r["layer_sqnr_mean_db"] is not None
    names = [c["name"] for c in res["acceptance"]["checks"]]
    assert any("best PSNR" in n for n in names)
    for f in ("results.json", "layers.json", "quality.md", "quality_sqnr_w4a4.png", "quality_frames_w4a4.png"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "results.json").read_text())
    assert saved["fp"]["rerun_exact"] is True and len(saved["runs"]) == 2


def test_fp_row_exact(evaluated):
    res, _ = evaluated
    fp = res["fp"]
    assert fp["rerun_exact"]
    m = fp["metrics"]
    assert m["psnr_db"] == PSNR_CAP and m["ssim"] == pytest.approx(1.0) and m["rel_l2"] == 0.0
    assert m["flicker_vs_fp"] == 0.0
    assert m["adherence"] == fp["adherence"]
    assert all(v == 0.0 for v in m["adherence_drop"].values())
    assert m["fd"] == pytest.approx(fp["fd"])


def test_docs_section_and_cli(evaluated, tmp_path):
    from dvdquant import cli
    from dvdquant.eval.report import BEGIN, END, install_docs
    _, out = evaluated
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "RESULTS.md").write_text("# Results\n\n<!-- BEGIN speed -->\nkeep me\n<!-- END speed -->\n")
    install_docs(out, docs)
    install_docs(out, docs)                                  # idempotent: one quality section
    text = (docs / "RESULTS.md").read_text()
    assert "keep me" in text and text.count(BEGIN) == 1 and text.count(END) == 1
    assert "| FP (fp32) | FP | 100.00 |" in text and "dvdquant eval" in text
    assert (docs / "results.json").is_file() and (docs / "img" / "quality_sqnr_w4a4.png").is_file()
    assert cli.main(["eval", "--from-results", str(out)]) == 0
