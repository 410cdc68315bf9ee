"""A few launches of the activation kernel at one shape, for Nsight Compute (ncu) to profile.

    ncu --section SpeedOfLight --section WarpStateStats --section InstructionStats -k regex:act_quant_kernel \
        --launch-skip 1 --launch-count 1 python3 benchmarks/act_profile_target.py --k 3072 --config '{"fma_div": true}'

Quantizes (``--m``, ``--k``) random bf16 tokens to the A4 int grid with the Hadamard-128 rotation fused and int8
codes (the default A4 path), ``--launches`` times after nothing else: the first launch compiles, so skip one.
No timing here: ncu measures.
"""
from __future__ import annotations

import argparse
import json

import torch

from dvdquant.kernels.triton_act_quant import act_quant
from dvdquant.numerics.hadamard import hadamard_matrix


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=32768)
    ap.add_argument("--k", type=int, default=3072)
    ap.add_argument("--config", default=None, help="JSON launch config of act_quant")
    ap.add_argument("--launches", type=int, default=3)
    args = ap.parse_args()
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.bfloat16)
    h = hadamard_matrix(128, device="cuda")
    cfg = json.loads(args.config) if args.config else None
    for _ in range(args.launches):
        act_quant(x, bits=4, h_block=h, config=cfg, codes_dtype=torch.int8)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
