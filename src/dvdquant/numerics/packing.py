"""int4 packing: two 4-bit codes per byte along the last dimension.

Layout: for codes ``q`` of shape (..., K) with K even, byte ``j`` of the packed tensor
(..., K/2) holds ``q[..., 2j]`` in its low nibble and ``q[..., 2j+1]`` in its high nibble.
The round trip is exact for codes in [0, 15].
"""
from __future__ import annotations

import torch

from ..errors import ConfigError


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes in [0, 15] of shape (..., K) into uint8 (..., K/2)."""
    if codes.shape[-1] % 2 != 0:
        raise ConfigError(f"int4 packing needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.int16)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise ConfigError("int4 codes must lie in [0, 15]")
    lo = c[..., 0::2]
    hi = c[..., 1::2]
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 (..., K/2) → uint8 codes (..., K)."""
    p = packed.to(torch.int16)
    lo = p & 0x0F
    hi = (p >> 4) & 0x0F
    out = torch.stack((lo, hi), dim=-1)  # (..., K/2, 2)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(torch.uint8)
