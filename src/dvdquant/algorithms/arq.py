"""ARQ — Auto-scaling Rotated Quantization: the data-free activation side.

Y = (X·H)(Hᵀ·Wᵀ): an orthogonal Hadamard H spreads activation outliers over all channels.
W·H is computed once here (then quantized by BGR); X·H happens online in
:class:`~dvdquant.nn.QuantLinear`, together with the run-time channel scaling Λ_t (absmax of
the current tokens per rotated channel, or per block of channels) and per-token quantization.
Nothing is calibrated: Λ_t is recomputed from the activations of every forward.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..errors import ConfigError
from ..numerics.hadamard import can_build_hadamard, hadamard_rotate, largest_hadamard_block

log = logging.getLogger(__name__)


def choose_rotation_block(in_features: int, requested: Optional[int]) -> Optional[int]:
    """Order of the Hadamard blocks for an input of ``in_features`` channels (None: no rotation).

    ``requested=None`` asks for a full rotation; if no order-``in_features`` Hadamard can be
    built, the largest constructible block dividing it is used (logged). A requested block that
    does not divide ``in_features`` is shrunk the same way.
    """
    if requested is not None and requested < 1:
        raise ConfigError(f"rotation block must be ≥ 1, got {requested}")
    target = in_features if requested is None else min(requested, in_features)
    if in_features % target == 0 and can_build_hadamard(target):
        block = target
    else:
        block = largest_hadamard_block(in_features, limit=target)
        log.info("no Hadamard block of order %d for %d channels; using blocks of %d", target, in_features, block)
    return block if block > 1 else None


def rotate_weight(w: torch.Tensor, block: int) -> torch.Tensor:
    """W (N, K) → W·blockdiag(H_block) in fp32 (rows rotated like the activations)."""
    return hadamard_rotate(w.double(), block).float()
