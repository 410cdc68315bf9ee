"""Decoded weights of quantized layers, kept between forwards of the simulated path.

``QuantLinear`` stores packed codes; its reference forward needs them as fp32 (Ŵ = Δ·(q − z),
or the integers q − z). Decoding costs a few passes over the weight per call, which on a CPU is
a sizeable share of a small layer's forward. :class:`DecodedWeights` keeps the decoded tensors
on the module, as a plain attribute (never a buffer: not in ``state_dict``, not saved, dropped by
``copy.deepcopy`` and pickling), and rebuilds one when any source tensor it was decoded from has
been replaced or written in place (identity, storage pointer and in-place version counter).
Tensors made under ``torch.inference_mode`` have no version counter: those are decoded every call.

Memory: the decoded copies of all layers together stay within :data:`BUDGET_BYTES` (default
1 GiB, environment ``DVDQUANT_DECODED_WEIGHT_CACHE_MB``; 0 switches caching off). A layer that
does not fit decodes per call, as without the cache, so a large model on the simulated path
never holds more than the budget beyond what it did before.
"""
from __future__ import annotations

import os
import weakref
from typing import Callable, Sequence

import torch

BUDGET_BYTES = int(float(os.environ.get("DVDQUANT_DECODED_WEIGHT_CACHE_MB", "1024")) * 2 ** 20)
_LIVE: "weakref.WeakSet[torch.Tensor]" = weakref.WeakSet()     # every cached tensor, for the budget


def cached_bytes() -> int:
    """Bytes held by decoded weights of all live layers."""
    return sum(t.numel() * t.element_size() for t in list(_LIVE))


def _source_key(t: torch.Tensor):
    return None if t.is_inference() else (weakref.ref(t), t.data_ptr(), t._version, t.device)


class DecodedWeights:
    """Decoded tensors of one module, each keyed on the tensors it was built from."""

    def __init__(self):
        self._entries: dict = {}

    def get(self, kind: str, sources: Sequence[torch.Tensor], build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached ``kind`` if ``sources`` are unchanged since it was built, else ``build()`` (cached if it fits)."""
        keys = [_source_key(t) for t in sources]
        hit = self._entries.get(kind)
        if hit is not None and None not in keys and len(hit[0]) == len(keys) and all(
                a[0]() is b[0]() and a[1:] == b[1:] for a, b in zip(hit[0], keys)):
            return hit[1]
        self._entries.pop(kind, None)
        value = build()
        if None not in keys and cached_bytes() + value.numel() * value.element_size() <= BUDGET_BYTES:
            self._entries[kind] = (keys, value)
            _LIVE.add(value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __deepcopy__(self, memo) -> "DecodedWeights":
        return DecodedWeights()

    def __getstate__(self) -> dict:
        return {"_entries": {}}

    def __setstate__(self, state: dict) -> None:
        self._entries = {}
