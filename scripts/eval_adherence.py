"""Prompt adherence of the embedded model: generate clips for known captions, classify them.

    python scripts/eval_adherence.py --clips 64 --steps 20 --guidance 4.0 --json adherence.json

Optional ``--model-dir``/``--classifier-dir`` point at freshly trained assets.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from dvdquant.data import sample_combinations, make_caption
from dvdquant.eval.classifier import adherence, load_classifier
from dvdquant.models.embedded import load_embedded
from dvdquant.pipeline import frame_grid_png, generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir")
    p.add_argument("--classifier-dir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--grid", help="PNG of the first 16 clips")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    model = load_embedded(args.device, directory=args.model_dir)
    clf = load_classifier(args.device, directory=args.classifier_dir)
    combos = sample_combinations(args.clips, seed=args.seed)
    prompts = [make_caption(f) for f in combos]
    t0 = time.time()
    videos = torch.cat([generate(model, prompts[i:i + 64], seed=args.seed + i, steps=args.steps,
                                 guidance=args.guidance, progress=False).videos
                        for i in range(0, len(prompts), 64)])
    wall = time.time() - t0
    acc = adherence(videos, combos, clf)
    res = {"clips": args.clips, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
           "device": args.device, "generation_wall_s": round(wall, 2), "accuracy": acc}
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    if args.grid:
        frame_grid_png(list(videos[:16]), args.grid, row_labels=prompts[:16])


if __name__ == "__main__":
    main()
