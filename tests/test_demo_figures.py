"""The README's demo figures and docs/demo_frames.png are what `dvdquant demo` computes.

One demo run at the README's settings (the CLI defaults) per session, in a fresh process as the script
and `dvdquant demo` run it: W4A4 rounding amplifies float-order differences over 20 steps, and the
same demo run inside this pytest process, after other tests, gave clips up to 1 dB apart. Its numbers
are compared with the block that scripts/update_demo_figures.py writes into the README (run that
script to refresh it). Tolerances: PSNR ±0.05 dB, SSIM ±0.002, mean pixel difference of the grid < 0.5.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("update_demo_figures", ROOT / "scripts" / "update_demo_figures.py")
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)


def _numbers(block: str, label: str, unit: str = "") -> list[float]:
    num = r"\d+(?:\.\d+)?"
    m = re.search(label + rf" ({num}(?: / {num})*)" + unit, block)
    assert m, f"no {label!r} figures in the README block:\n{block}"
    return [float(v) for v in m.group(1).split(" / ")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('f', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); m.run_readme_demo(sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(ROOT / "scripts" / "update_demo_figures.py"), str(out)],
                   env=env, check=True, timeout=3600)
    return json.loads((out / "report.json").read_text()), out


def test_render_block_roundtrips_through_the_parser():
    r = dict(steps=20, seed=0, method="m", transformer_weight_mb_fp32=26.7, transformer_weight_mb_quantized=5.9,
             layers_quantized=60, mean_weight_rel_error=0.1, mean_weight_rel_error_minmax=0.11,
             psnr_db=[18.68, 24.43], ssim=[0.8123, 0.9])
    block = figures.render_block(r)
    assert figures.readme_block("x\n" + block + "\ny") == block
    assert _numbers(block, "PSNR", " dB") == [18.68, 24.43] and _numbers(block, "SSIM") == [0.812, 0.9]


@pytest.mark.slow
def test_readme_demo_figures_match_the_demo(demo):
    r, _ = demo
    block = figures.readme_block()
    expected = figures.render_block(r)
    hint = f"README demo figures are stale; run `python scripts/update_demo_figures.py`. The demo gives:\n{expected}"
    assert _numbers(block, "PSNR", " dB") == pytest.approx(r["psnr_db"], abs=0.05), hint
    assert _numbers(block, "SSIM") == pytest.approx(r["ssim"], abs=0.002), hint
    strip = lambda s: re.sub(r"PSNR .*", "", s)                                     # noqa: E731
    assert strip(block) == strip(expected), hint                     # sizes, layers, weight errors, settings


@pytest.mark.slow
def test_docs_demo_frames_png_is_the_demos(demo):
    from PIL import Image
    _, out = demo
    mine = np.asarray(Image.open(out / "frames.png").convert("RGB"), dtype=np.int16)
    docs = np.asarray(Image.open(ROOT / "docs" / "demo_frames.png").convert("RGB"), dtype=np.int16)
    assert mine.shape == docs.shape, "docs/demo_frames.png is stale: run scripts/update_demo_figures.py"
    assert np.abs(mine - docs).mean() < 0.5, "docs/demo_frames.png is stale: run scripts/update_demo_figures.py"
