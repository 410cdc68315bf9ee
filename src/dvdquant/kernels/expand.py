"""int4 → FP8 (or int8) weight expansion, just before the GEMM.

Why: BGR stores each 4-bit weight as an unsigned code q ∈ [0, 15] with an integer zero point
z per output channel, packed two per byte (``numerics/packing.py``: byte j of a row holds
code 2j in its low nibble and code 2j+1 in its high nibble). Hopper has no int4 tensor cores,
but every integer in [−15, 15] is exactly representable in FP8 e4m3, so

    Ŵ = Δ ⊙ (q − z)   with   (q − z) stored as float8_e4m3fn, exactly,

and Δ (N,) goes into ``_scaled_mm``'s per-column scale. No activation-sum correction term is
needed (the zero point is folded into the FP8 integers).

Memory: the packed weight is 0.5 byte/parameter. Expanding into a *reusable per-shape buffer*
right before each GEMM keeps only one layer's FP8 weight alive per distinct (N, K), at the cost
of one memory-bound pass (read N·K/2 bytes, write N·K bytes) per call.

The same table-driven kernel writes int8 (q − z) for the INT8 tensor-core GEMM of 6–8-bit
integer activations (:func:`expand_int4_to_int8`); only the lookup table differs.

The buffer pool is keyed by (N, K, dtype, device) and relies on stream order: a buffer is rewritten
by the next layer's expansion only after the previous GEMM that read it was enqueued on the
same stream. Do not share one pool across concurrent streams.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from ..errors import ConfigError


@triton.jit
def expand_int4_kernel(p_ptr, z_ptr, lut_ptr, out_ptr, N, KH, stride_pn, stride_on,
                       BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), cdiv(K/2, BLOCK_KH)); one packed byte in, two FP8 bytes out.

    ``out_ptr`` is the (N, K) FP8 output viewed as int16 (N, K/2): byte j of row n (codes 2j in
    the low nibble, 2j+1 in the high one) becomes the int16 whose low byte (lower address on a
    little-endian GPU) is e4m3(q[2j] − z[n]) and whose high byte is e4m3(q[2j+1] − z[n]). That
    pair depends only on (z, byte): it is read from ``lut_ptr``, a (16, 256) int16 table built
    by torch's own casts (:func:`_pair_table`), so the kernel does no float or bit arithmetic at
    all and is exact by construction. Loads and stores are contiguous along the row; the 8 KB
    table stays in L1.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_k * BLOCK_KH + tl.arange(0, BLOCK_KH)                    # packed-byte index j
    mask = (rows[:, None] < N) & (cols[None, :] < KH)
    byte = tl.load(p_ptr + rows[:, None] * stride_pn + cols[None, :], mask=mask, other=0).to(tl.int32)
    zi = tl.load(z_ptr + rows, mask=rows < N, other=0.0).to(tl.int32)[:, None]   # (BLOCK_N, 1) integer z
    pair = tl.load(lut_ptr + zi * 256 + byte, mask=mask, other=0)        # (BLOCK_N, BLOCK_KH) int16
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :], pair, mask=mask)


def _byte_of(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The storage byte (int32 0…255) of the integers ``v`` (fp32) cast to ``dtype`` (e4m3 or int8)."""
    return v.to(dtype).view(torch.uint8).to(torch.int32)


@lru_cache(maxsize=8)
def _pair_table(device: str, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """(16, 256) int16: entry [z, b] holds the two ``dtype`` bytes of (b & 15) − z (low) and (b >> 4) − z
    (high), for every zero point z ∈ [0, 15] and packed byte b — made with torch's own casts."""
    b = torch.arange(256, dtype=torch.int32)
    z = torch.arange(16, dtype=torch.float32)[:, None]
    lo = _byte_of((b & 15).float()[None, :] - z, dtype)
    hi = _byte_of((b >> 4).float()[None, :] - z, dtype)
    pair = lo | (hi << 8)                                               # 0 … 65535
    return torch.where(pair >= 32768, pair - 65536, pair).to(torch.int16).to(device)


def expand_int4_to_fp8(packed: torch.Tensor, zero: torch.Tensor, out: torch.Tensor = None,
                       block_n: int = 32, block_kh: int = 256, num_warps: int = 4,
                       dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """Packed uint8 (N, K/2) and integer zero points (N, 1) in [0, 15] → float8_e4m3fn (N, K) holding q − z
    (``dtype=torch.int8``: int8, for the INT8 GEMM; see :func:`expand_int4_to_int8`).

    The zero points are those BGR/MinMax produce (``round`` then ``clamp(0, 15)``); other values
    are outside the lookup table and not checked here (that would cost a device sync per call).
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ConfigError(f"packed int4 weights must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    if dtype not in (torch.float8_e4m3fn, torch.int8):
        raise ConfigError(f"int4 weights expand to float8_e4m3fn or int8, not {dtype}")
    n, kh = packed.shape
    k = 2 * kh
    if zero.numel() != n:
        raise ConfigError(f"expansion needs one zero point per row (N={n}), got {tuple(zero.shape)}")
    if out is None:
        out = torch.empty(n, k, dtype=dtype, device=packed.device)
    elif out.shape != (n, k) or out.dtype != dtype or out.stride(1) != 1 or out.stride(0) % 2:
        raise ConfigError(f"output buffer must be contiguous {dtype} ({n}, {k})")
    if n == 0 or kh == 0:
        return out
    packed = packed if packed.stride(1) == 1 else packed.contiguous()
    z = zero.reshape(n).to(torch.float32).contiguous()
    out16 = out.view(torch.int16)                                        # (N, K/2): two codes per element
    grid = (triton.cdiv(n, block_n), triton.cdiv(kh, block_kh))
    expand_int4_kernel[grid](packed, z, _pair_table(str(packed.device), dtype), out16, n, kh, packed.stride(0),
                             out16.stride(0), BLOCK_N=block_n, BLOCK_KH=block_kh, num_warps=num_warps)
    return out


def expand_int4_to_int8(packed: torch.Tensor, zero: torch.Tensor, out: torch.Tensor = None) -> torch.Tensor:
    """Packed uint8 (N, K/2) and zero points (N, 1) → int8 (N, K) holding q − z (same kernel, int8 table)."""
    return expand_int4_to_fp8(packed, zero, out=out, dtype=torch.int8)


def expand_reference(packed: torch.Tensor, zero: torch.Tensor,
                     dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """Torch reference: unpack, subtract the zero point, cast (exact)."""
    from ..numerics.packing import unpack_int4

    return (unpack_int4(packed).float() - zero.reshape(-1, 1).float()).to(dtype)


class ExpansionPool:
    """One reusable buffer per (N, K, dtype, device): peak memory is one layer's expanded weight per shape."""

    def __init__(self) -> None:
        self._buffers: Dict[Tuple[int, int, torch.dtype, str], torch.Tensor] = {}

    def _buffer(self, n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (n, k, dtype, str(device))
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.empty(n, k, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf

    def expand(self, packed: torch.Tensor, zero: torch.Tensor,
               dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
        buf = self._buffer(packed.shape[0], packed.shape[1] * 2, dtype, packed.device)
        return expand_int4_to_fp8(packed, zero, out=buf, dtype=dtype)

    def expand_many(self, packed: list, zeros: list, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
        """Several packed weights with the same K, expanded one below the other into one (ΣN, K) buffer
        (fused sibling projections: one GEMM instead of several)."""
        n = sum(p.shape[0] for p in packed)
        buf = self._buffer(n, packed[0].shape[1] * 2, dtype, packed[0].device)
        row = 0
        for p, z in zip(packed, zeros):
            expand_int4_to_fp8(p, z, out=buf[row:row + p.shape[0]], dtype=dtype)
            row += p.shape[0]
        return buf

    def clear(self) -> None:
        self._buffers.clear()

    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())
