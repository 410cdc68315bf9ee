"""Reductions shared by the quantizers, in fewer passes over the data than their plain spelling.

:func:`absmax` is ``x.abs().amax(dim)`` bit for bit without the full-size
``|x|`` temporary: max|x| = max(max x, −min x) (``abs`` and negation are exact), and the final ``abs`` of
the small result makes a zero +0 and a NaN positive, as ``abs`` first does (a NaN result may carry
another payload: every consumer treats any NaN alike).
"""
from __future__ import annotations

import torch


def absmax(x: torch.Tensor, dim, keepdim: bool = False) -> torch.Tensor:
    """``x.abs().amax(dim=dim, keepdim=keepdim)``: two reductions over ``x``, no full-size temporary.

    NaN propagates (a NaN input gives a NaN result, as with ``abs().amax()``), ±Inf gives +Inf.
    """
    return torch.maximum(x.amax(dim=dim, keepdim=keepdim), x.amin(dim=dim, keepdim=keepdim).neg_()).abs_()


__all__ = ["absmax"]
