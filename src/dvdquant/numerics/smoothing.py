"""Dynamic smoothing (DVD-Quant ``smoothing="dynamic"``): the per-sample scales and re-quantized weights.

Contract, shared by the simulated path (``QuantLinear``), the emulated pipeline and the Triton
weight kernel (:mod:`dvdquant.kernels.weight_requant`), all fp32, one rounding per operation::

    s_g   = Λ_g^α / max(colmax, 1e-12)^(1−α)   per sample g and channel (1 where Λ_g = 0)
    W     = ((m · scale_n) · max(colmax_k, 1e-12))          the decoded int8 master (or a float master)
    W_g   = W · s_g[k]                                       per sample
    Ŵ_g   = Q_minmax(hadamard_rotate_exact(W_g))            per row (numerics.grids, group None or groups)

Every step is per row and exact by construction (the rotation's snap and exact ±1 sums, the
min/max grid), so a row's bits do not depend on how many samples are re-quantized together.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import grids
from .hadamard import hadamard_rotate_exact

COLMAX_FLOOR = 1e-12
CHUNK_ELEMENTS = 1 << 24     # per-sample weights re-quantized together (G·N·K entries); any chunking gives the same bits


def smoothing_scales(lam: torch.Tensor, colmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s (G, K) fp32 from the per-sample channel absmax ``lam`` (G, K) (already reduced over every rank's
    tokens) and the master's column maxima ``colmax`` (K,); 1 where a sample's channel is all zero."""
    lam = lam.float()
    s = lam.clamp_min(COLMAX_FLOOR).pow(alpha) / colmax.clamp_min(COLMAX_FLOOR).pow(1.0 - alpha)
    return torch.where(lam > 0, s, torch.ones_like(s))


def decode_master(codes: torch.Tensor, scale: Optional[torch.Tensor], colmax: torch.Tensor) -> torch.Tensor:
    """The master weight (N, K) fp32: ((m · scale_n) · max(colmax_k, 1e-12)) for int8 codes with their
    row scale (N, 1); a float master (``scale`` None) as it is."""
    if scale is None:
        return codes.float()
    return codes.float() * scale * colmax.clamp_min(COLMAX_FLOOR)


def smoothed_weight_params(w: torch.Tensor, s: Optional[torch.Tensor], rotation_block: Optional[int], bits: int,
                           group_size: Optional[int], symmetric: bool) -> grids.WeightQParams:
    """Q_RTN(W·diag(s_g)·H) for the decoded master ``w`` (N, K) and ``s`` (G, K), stacked row-wise
    ((G·N, K) codes, sample by sample); ``s`` None: s = 1 (N rows)."""
    if s is not None:
        w = (w.unsqueeze(0) * s.unsqueeze(1)).reshape(-1, w.shape[1])       # (G·N, K)
    if rotation_block:
        w = hadamard_rotate_exact(w, rotation_block)
    return grids.quantize_weight_minmax(w, bits, group_size, symmetric)


def per_sample_weight_params(w: torch.Tensor, s: torch.Tensor, rotation_block: Optional[int], bits: int,
                             group_size: Optional[int], symmetric: bool, chunk_elements: int = CHUNK_ELEMENTS):
    """:func:`smoothed_weight_params` of each row of ``s`` (G, K), one (N rows) per sample in order,
    re-quantized in chunks of ≤ ``chunk_elements`` weight entries (the chunking does not change bits)."""
    n, k = w.shape
    chunk = max(1, chunk_elements // max(n * k, 1))
    for i in range(0, s.shape[0], chunk):
        p = smoothed_weight_params(w, s[i:i + chunk], rotation_block, bits, group_size, symmetric)
        for r in range(0, p.codes.shape[0], n):
            yield grids.WeightQParams(p.codes[r:r + n], p.scale[r:r + n], p.zero[r:r + n], p.bits, p.group_size)


__all__ = ["CHUNK_ELEMENTS", "COLMAX_FLOOR", "smoothing_scales", "decode_master", "smoothed_weight_params",
           "per_sample_weight_params"]
