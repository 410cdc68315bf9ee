"""Scratch buffers kept between calls of the simulated path on the CPU.

A fresh tensor of a few MiB is, with glibc's allocator, often new memory from the OS: its pages fault in on
first touch, which costs about as much as an elementwise pass over it. Temporaries that never leave a
function (the exact rotation's intermediate product, the attention reference's scores) therefore come from
:func:`scratch`: one fp32/fp64 buffer per (thread, slot), grown on demand, of at most :data:`KEEP_MAX_ELEMENTS`
elements kept. Contents are undefined; a buffer is valid until the next :func:`scratch` call with the same
slot on the same thread, so a function must not hold one across a call that may take the same slot. Other
devices get a fresh tensor every call (their caching allocators already reuse memory).
"""
from __future__ import annotations

import threading

import torch

KEEP_MAX_ELEMENTS = 1 << 25          # 128 MiB of fp32 per slot at most stays allocated
_local = threading.local()


def scratch(numel: int, dtype: torch.dtype, device, slot: str) -> torch.Tensor:
    """A contiguous 1-D buffer of ``numel`` elements of ``dtype`` on ``device`` (contents undefined)."""
    device = torch.device(device)
    if device.type != "cpu" or numel > KEEP_MAX_ELEMENTS:
        return torch.empty(numel, dtype=dtype, device=device)
    kept = _local.__dict__.setdefault("buffers", {})
    buf = kept.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        buf = kept[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


__all__ = ["scratch", "KEEP_MAX_ELEMENTS"]
