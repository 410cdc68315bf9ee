"""Run-time statistics per sample: a Linear input's tokens grouped by batch element.

Contract: a Linear input of shape (B, ..., K) with ≥ 3 dims has B *samples*; its flattened
tokens (M, K), M = B·L, are B contiguous groups of L rows. A 2-D input (M, K) carries no batch
axis and is one group (diffusers video transformers call their block Linears with (B, L, K);
their 2-D calls are per-sample vectors such as the timestep embedding). Statistics over tokens
(ARQ's Λ_t, dynamic smoothing's s_t) are taken per group, so a sample's output does not depend
on the other samples of its batch (other prompts, the other half of classifier-free guidance).
Scaling by a per-sample (G, K) tensor is elementwise: the same fp32 operation as with one (1, K)
row, whatever G is.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .reduce import absmax


def sample_count(shape: Sequence[int]) -> int:
    """Number of samples of a Linear input of ``shape``: the leading dim for ≥ 3-D inputs, else 1."""
    return int(shape[0]) if len(shape) >= 3 else 1


def per_sample_absmax(x2: torch.Tensor, samples: int) -> torch.Tensor:
    """(G, K) per-channel absmax of each sample's tokens; ``x2`` (M, K) with M = G·L, ``samples`` = G."""
    m, k = x2.shape
    return absmax(x2.reshape(samples, m // samples, k), 1)


def scale_per_sample(x2: torch.Tensor, lam: torch.Tensor, divide: bool) -> torch.Tensor:
    """``x2`` (M, K) divided (``divide``) or multiplied by its sample's row of ``lam`` (G, K) or (1, K)."""
    g, k = lam.shape
    xs = x2.reshape(g, x2.shape[0] // g, k)
    out = xs / lam.unsqueeze(1) if divide else xs * lam.unsqueeze(1)
    return out.reshape(x2.shape)


def rows_per_sample(x2: torch.Tensor, samples: int) -> list:
    """``x2`` (M, ...) split into its ``samples`` groups of M/G contiguous rows (views)."""
    return list(x2.reshape(samples, x2.shape[0] // samples, *x2.shape[1:]).unbind(0))


def matmul_per_sample(x2: torch.Tensor, w: torch.Tensor, samples: int) -> torch.Tensor:
    """``x2`` (M, K) @ ``w``ᵀ (N, K) → (M, N) fp32, one GEMM per sample.

    A float GEMM's blocking (CPU BLAS, cuBLAS heuristics, split-K) depends on M, so a row's bits
    can change with the number of rows; a per-sample GEMM has the same shape alone and in a batch.
    """
    if samples == 1:
        return x2 @ w.t()
    y = torch.empty(x2.shape[0], w.shape[0], dtype=torch.result_type(x2, w), device=x2.device)
    for xs, ys in zip(rows_per_sample(x2, samples), rows_per_sample(y, samples)):
        torch.mm(xs, w.t(), out=ys)                                  # each sample's rows written in place
    return y


__all__ = ["sample_count", "per_sample_absmax", "scale_per_sample", "rows_per_sample", "matmul_per_sample"]
