"""Weight-code packing: int4 two per byte (the layout kernels read), and dense b-bit rows (checkpoints).

int4 layout: for codes ``q`` of shape (..., K) with K even, byte ``j`` of the packed tensor
(..., K/2) holds ``q[..., 2j]`` in its low nibble and ``q[..., 2j+1]`` in its high nibble.
The round trip is exact for codes in [0, 15]. :func:`pack_bits` packs codes of any width 1..8
into ⌈K·b/8⌉ bytes per row (checkpoints store 3-, 5-, 6- and 7-bit weights that way).
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


def packed_bytes(k: int, bits: int) -> int:
    """Bytes per row of :func:`pack_bits`: ⌈k·bits / 8⌉."""
    return (k * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes in [0, 2^bits − 1] of shape (..., K) densely into uint8 (..., ⌈K·bits/8⌉).

    Row-wise little-endian bit stream: code ``j`` occupies bits ``j·bits … j·bits + bits − 1`` of
    its row (bit ``i`` of the stream is bit ``i mod 8`` of byte ``i // 8``); the tail is zero.
    For ``bits = 4`` this is the layout of :func:`pack_int4`.
    """
    if not 1 <= bits <= 8:
        raise ConfigError(f"pack_bits needs 1..8 bits, got {bits}")
    c = codes.to(torch.int16)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2 ** bits):
        raise ConfigError(f"{bits}-bit codes must lie in [0, {2 ** bits - 1}]")
    k = c.shape[-1]
    shifts = torch.arange(bits, dtype=torch.int16, device=c.device)
    stream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(*c.shape[:-1], k * bits)
    nbytes = packed_bytes(k, bits)
    stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - k * bits))
    weights = (1 << torch.arange(8, dtype=torch.int16, device=c.device))
    return (stream.reshape(*c.shape[:-1], nbytes, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (..., ⌈k·bits/8⌉) → uint8 codes (..., k)."""
    if packed.shape[-1] != packed_bytes(k, bits):
        raise ConfigError(f"{k} codes of {bits} bits take {packed_bytes(k, bits)} bytes per row, "
                          f"got {packed.shape[-1]}")
    p = packed.to(torch.int16)
    stream = ((p.unsqueeze(-1) >> torch.arange(8, dtype=torch.int16, device=p.device)) & 1)
    stream = stream.reshape(*p.shape[:-1], -1)[..., :k * bits].reshape(*p.shape[:-1], k, bits)
    weights = (1 << torch.arange(bits, dtype=torch.int16, device=p.device))
    return (stream * weights).sum(-1).to(torch.uint8)
