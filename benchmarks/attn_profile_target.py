"""One launch of each 8-bit attention kernel at a moderate shape, for Nsight Compute (ncu) to profile.

    ncu --set full --import-source yes -k regex:attn_fwd --launch-skip 2 --launch-count 2 -o prof \
        python3 benchmarks/attn_profile_target.py

Runs, after one warm-up call each, the Triton kernel (``_attn_fwd_kernel``) and the Gluon kernel
(``_attn_fwd_gluon_kernel``) once each: 1 × 16 heads × 8192 tokens × 128 (long enough for the steady state
of the key loop, short enough for ncu's replays). No timing here: ncu measures. With two kernels, pass
``--launch-skip 2 --launch-count 2``. (Session 7's profile, ``docs/results/attn_ncu_s7_h100.json``, ran at
commit 57611d5, which also had a warp-specialized ping-pong kernel, since removed: skip/count 3.)
"""
from __future__ import annotations

import sys

import torch

from dvdquant.kernels.attention_triton import quant_attention


def main() -> int:
    B, H, L, D = 1, 16, 8192, 128
    if len(sys.argv) > 1:
        H, L = int(sys.argv[1]), int(sys.argv[2])
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    for impl in ("triton", "gluon"):
        quant_attention(q, k, v, impl=impl)        # warm-up: compiles (ncu's -c counts only matching launches)
    torch.cuda.synchronize()
    for impl in ("triton", "gluon"):
        quant_attention(q, k, v, impl=impl)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
