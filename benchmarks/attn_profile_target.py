"""One launch of each 8-bit attention kernel at a moderate shape, for Nsight Compute (ncu) to profile.

    ncu --set full --import-source yes -k regex:'attn_fwd' -c 3 -o prof python3 benchmarks/attn_profile_target.py

Runs, after one warm-up call each, the Triton kernel (``_attn_fwd_kernel``), the one-warpgroup Gluon kernel
(``_attn_fwd_gluon_kernel``) and the ping-pong Gluon kernel (``_attn_fwd_ws_kernel``) once on the same
pre-quantized K/V: 1 × 16 heads × 8192 tokens × 128 (long enough for the steady state of the key loop,
short enough for ncu's replays). No timing here: ncu measures.
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
    for impl in ("triton", "gluon", "gluon_ws"):
        quant_attention(q, k, v, impl=impl)        # warm-up: compiles (ncu's -c counts only matching launches)
    torch.cuda.synchronize()
    for impl in ("triton", "gluon", "gluon_ws"):
        quant_attention(q, k, v, impl=impl)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
