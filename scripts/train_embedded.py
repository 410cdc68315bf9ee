"""Train the embedded video DiT (rectified flow) and write its hash-checked weights.

Reproduces dvdquant/assets/embedded/ (see docs/MODEL.md for the command that made it):

    python scripts/train_embedded.py --out src/dvdquant/assets/embedded --steps 6000

On CPU use tiny settings to check the script runs: ``--steps 3 --batch 2 --device cpu``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields

from dvdquant.models.training import TrainConfig, train_embedded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the safetensors, config.json, sha256.json")
    p.add_argument("--device", default="cuda")
    for f in fields(TrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default) if f.type != "bool" else int,
                       default=f.default)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig(**{f.name: (bool(getattr(args, f.name)) if f.type == "bool" else getattr(args, f.name))
                         for f in fields(TrainConfig)})
    train_embedded(cfg, args.out, args.device)


if __name__ == "__main__":
    main()
