"""Train the evaluator classifier on generator clips and write its hash-checked weights.

    python scripts/train_classifier.py --out src/dvdquant/assets/classifier --steps 1500

CPU smoke test: ``--device cpu --steps 3 --batch 4``.
"""

from __future__ import annotations

import argparse
import logging

from dvdquant.eval.classifier import train_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=4096, help="fresh clips for the held-out accuracy")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train_classifier(args.out, args.device, args.steps, args.batch, args.lr, args.seed, args.heldout)


if __name__ == "__main__":
    main()
