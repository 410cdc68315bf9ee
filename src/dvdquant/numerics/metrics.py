"""Error metrics used by tests, reports and the layer diagnostics."""
from __future__ import annotations

import math

import torch


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10·log10(‖ref‖² / ‖ref − test‖²) in dB (inf if exact)."""
    r = ref.double()
    noise = (r - test.double()).pow(2).sum().item()
    signal = r.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def relative_error(ref: torch.Tensor, test: torch.Tensor) -> float:
    """‖ref − test‖ / ‖ref‖ (Frobenius); 0 if both are zero."""
    r = ref.double()
    num = torch.linalg.vector_norm(r - test.double()).item()
    den = torch.linalg.vector_norm(r).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den
