"""Run `dvdquant demo` at the README's settings and write its figures into the README (the block between
the ``demo-figures`` markers) and its frame grid into docs/demo_frames.png.

    python scripts/update_demo_figures.py            # rewrite README.md and docs/demo_frames.png
    python scripts/update_demo_figures.py --check    # exit 1 if they differ from what the demo computes

tests/test_demo_figures.py fails when the README's figures drift from the demo's.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FRAMES = ROOT / "docs" / "demo_frames.png"
START = "<!-- demo-figures: written by scripts/update_demo_figures.py from `dvdquant demo` -->"
END = "<!-- /demo-figures -->"


def run_readme_demo(out_dir) -> dict:
    """The demo exactly as the README's first command runs it (`dvdquant demo`, its defaults)."""
    from dvdquant.cli import build_parser
    from dvdquant.config import DVDQuantConfig
    from dvdquant.pipeline.demo import DEMO_PROMPTS, run_demo
    a = build_parser().parse_args(["demo", "--out", str(out_dir)])
    return run_demo(a.out, steps=a.steps, seed=a.seed, prompts=tuple(a.prompt or DEMO_PROMPTS),
                    config=DVDQuantConfig(w_bits=4, a_bits=4, attention=a.attention), progress=False)


def render_block(r: dict) -> str:
    psnr = " / ".join(f"{v:.2f}" for v in r["psnr_db"])
    ssim = " / ".join(f"{v:.3f}" for v in r["ssim"])
    return (f"{START}\nReport of that run ({r['steps']} steps, seed {r['seed']}, {r['method']}): transformer weights "
            f"{r['transformer_weight_mb_fp32']} MB fp32 → {r['transformer_weight_mb_quantized']} MB, "
            f"{r['layers_quantized']} layers quantized, mean relative weight error {r['mean_weight_rel_error']} "
            f"(MinMax {r['mean_weight_rel_error_minmax']}); each W4A4 clip vs the FP clip of the same prompt, seed "
            f"and noise: PSNR {psnr} dB, SSIM {ssim}.\n{END}")


def readme_block(text: str | None = None) -> str:
    text = README.read_text() if text is None else text
    m = re.search(re.escape(START) + r".*?" + re.escape(END), text, flags=re.S)
    if m is None:
        raise SystemExit(f"{README} has no demo-figures block ({START} … {END})")
    return m.group(0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        r = run_readme_demo(Path(tmp) / "demo")
        block, text = render_block(r), README.read_text()
        if args.check:
            same = readme_block(text) == block
            print("README demo figures: " + ("up to date" if same else f"differ; the demo gives:\n{block}"))
            return 0 if same else 1
        README.write_text(text.replace(readme_block(text), block))
        shutil.copyfile(Path(tmp) / "demo" / "frames.png", FRAMES)
    print(f"updated {README.relative_to(ROOT)} and {FRAMES.relative_to(ROOT)}:\n{block}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
