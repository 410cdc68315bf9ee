"""BGR — Bounded-init Grid Refinement: data-free weight quantization.

Objective per row (or per (row, group)) of W: min ‖W − Δ(W_q − z)‖², W_q ∈ [0, 2^b − 1].

1. *Bounded init.* Video-DiT weights are near-Gaussian: MinMax spends grid levels on the few
   tail values. We shrink the row's bounds [min W, max W] (widened to contain 0) by factors
   α ∈ [shrink_min, 1] and keep, per row, the α with the least error. α = 1 is MinMax itself,
   so the init is never worse than MinMax.
2. *Grid refinement.* Coordinate descent in closed form, all rows at once:
   with W_q, z fixed, Δ = ⟨W_q − z, W⟩ / ⟨W_q − z, W_q − z⟩ (least squares);
   with Δ fixed, z = round(mean(W_q − W/Δ)) clamped to the code range (least squares, then
   rounded); re-round W_q; repeat until the total error gain of an iteration falls under
   ``tol``. The best iterate of each row is kept, so the result is never worse than the init.

Everything is vectorised over rows; it runs where the weight lives (GPU for big models).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import BGRConfig
from ..errors import ConfigError
from ..numerics import grids


def _row_error(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    q = grids.weight_codes_from_params(rows, scale, zero, bits)
    return (scale * (q - zero) - rows).pow(2).sum(dim=1, keepdim=True), q


def bounded_init(rows: torch.Tensor, bits: int, symmetric: bool, cfg: BGRConfig):
    """Per-row best shrink of the MinMax bounds → (scale, zero, err, err_minmax), each (R, 1)."""
    lo0, hi0 = grids.minmax_bounds(rows)
    alphas = torch.linspace(1.0, cfg.shrink_min, cfg.shrink_steps).tolist()
    best = None
    err_minmax = None
    for a in alphas:
        scale, zero = grids._params_from_range(lo0 * a, hi0 * a, bits, symmetric)
        err, _ = _row_error(rows, scale, zero, bits)
        if best is None:
            best, err_minmax = (scale, zero, err), err
            continue
        better = err < best[2]
        best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]),
                torch.where(better, err, best[2]))
    return best[0], best[1], best[2], err_minmax


def refine_grid(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, err: torch.Tensor,
                bits: int, symmetric: bool, cfg: BGRConfig):
    """Alternating closed-form Δ / z updates with re-rounding; keeps each row's best iterate."""
    qmax = 2 ** bits - 1
    best_s, best_z, best_e = scale, zero, err
    _, q = _row_error(rows, scale, zero, bits)
    prev_total = float(err.sum())
    iters = 0
    for iters in range(1, cfg.max_iters + 1):
        d = q - zero
        num = (d * rows).sum(dim=1, keepdim=True)
        den = (d * d).sum(dim=1, keepdim=True)
        new_s = torch.where((den > 0) & (num > 0), num / den.clamp_min(1e-30), scale)
        if symmetric:
            new_z = zero
        else:
            new_z = torch.clamp(torch.round((q - rows / new_s).mean(dim=1, keepdim=True)), 0, qmax)
        e, q = _row_error(rows, new_s, new_z, bits)
        scale, zero = new_s, new_z
        better = e < best_e
        best_s = torch.where(better, scale, best_s)
        best_z = torch.where(better, zero, best_z)
        best_e = torch.where(better, e, best_e)
        total = float(best_e.sum())
        if prev_total <= 0 or (prev_total - total) / prev_total < cfg.tol:
            break
        prev_total = total
    return best_s, best_z, best_e, iters


def bgr_quantize(w: torch.Tensor, bits: int, group_size: Optional[int] = None, symmetric: bool = False,
                 cfg: Optional[BGRConfig] = None) -> tuple[grids.WeightQParams, dict]:
    """Quantize ``w`` (N, K) with BGR. Returns the parameters and errors of MinMax / init / final."""
    cfg = cfg or BGRConfig()
    if w.dim() != 2:
        raise ConfigError(f"weight must be 2-D, got shape {tuple(w.shape)}")
    grids.check_finite(w, "weight")
    rows = grids._group_view(w.float(), group_size)
    scale, zero, err_init, err_mm = bounded_init(rows, bits, symmetric, cfg)
    scale, zero, err, iters = refine_grid(rows, scale, zero, err_init, bits, symmetric, cfg)
    codes = grids.weight_codes_from_params(rows, scale, zero, bits)
    n, k = w.shape
    g = rows.shape[0] // n
    params = grids.WeightQParams(codes.reshape(n, k).to(torch.uint8), scale.reshape(n, g),
                                 zero.reshape(n, g), bits, group_size)
    norm = float(rows.pow(2).sum()) ** 0.5 or 1.0
    info = {"err_minmax": float(err_mm.sum()) ** 0.5 / norm, "err_init": float(err_init.sum()) ** 0.5 / norm,
            "err": float(err.sum()) ** 0.5 / norm, "iters": iters}
    return params, info
