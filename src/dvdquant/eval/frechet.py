"""Fréchet distance between Gaussians fitted to features, and its bootstrap over prompts (float64).

FD(a, b) = ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 tr((Σ_a Σ_b)^½), with tr((Σ_a Σ_b)^½) = Σ √λ of the
symmetric PSD matrix Σ_b^½ Σ_a Σ_b^½ (D-space), or the nuclear norm of X_a X_bᵀ / √((N−1)(M−1)) for
centred samples (sample space, when N·M < D²); :func:`frechet_distance_reference` is the plain form.

:class:`FrechetBootstrap` fixes, for one set of prompts, ``reps`` resamples of the prompts (seeded:
:func:`dvdquant.eval.stats.bootstrap_indices`) and the real clips of the resampled prompts; each
evaluated row gets its FD on every resample. Rows evaluated in different calls share the resamples
(same n, reps, seed), so FD_A[r] − FD_B[r] is a paired bootstrap replicate of the difference.
"""
from __future__ import annotations

import torch

from .stats import bootstrap_indices

CHUNK = 64   # resamples per batched eigen-decomposition


def _sqrtm_psd(s: torch.Tensor) -> torch.Tensor:
    e, v = torch.linalg.eigh(s)
    return (v * e.clamp_min(0).sqrt().unsqueeze(-2)) @ v.transpose(-1, -2)


def _trace_sqrt(root_b: torch.Tensor, s_a: torch.Tensor) -> torch.Tensor:
    """tr((Σ_a Σ_b)^½) from Σ_b^½ and Σ_a (D-space: one D × D eigen-decomposition)."""
    m = root_b @ s_a @ root_b
    return torch.linalg.eigvalsh((m + m.transpose(-1, -2)) / 2).clamp_min(0).sqrt().sum(-1)


def _trace_sqrt_samples(xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """tr((Σ_a Σ_b)^½) from centred samples (N, D), (M, D): the nuclear norm of X_a X_bᵀ / √((N−1)(M−1)).

    The non-zero eigenvalues of Σ_a Σ_b are the squared singular values of X_a X_bᵀ / √((N−1)(M−1));
    cheaper than the D-space form when N·M < D².
    """
    na, nb = xa.shape[-2], xb.shape[-2]
    return torch.linalg.svdvals(xa @ xb.transpose(-1, -2)).sum(-1) / ((na - 1) * (nb - 1)) ** 0.5


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean (..., D), centred samples (..., N, D) and the trace of the unbiased covariance (...,)."""
    mu = x.mean(-2)
    xc = x - mu.unsqueeze(-2)
    return mu, xc, xc.pow(2).sum((-2, -1)) / (x.shape[-2] - 1)


def _cov(xc: torch.Tensor) -> torch.Tensor:
    return xc.transpose(-1, -2) @ xc / (xc.shape[-2] - 1)


def _sample_space(na: int, nb: int, d: int) -> bool:
    return na * nb < d * d


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FD between features a (N, D) and b (M, D); nan when either has fewer than 2 rows."""
    if a.shape[0] < 2 or b.shape[0] < 2:
        return float("nan")
    (mu_a, xa, tr_a), (mu_b, xb, tr_b) = _moments(a.double()), _moments(b.double())
    if _sample_space(a.shape[0], b.shape[0], a.shape[1]):
        cross = _trace_sqrt_samples(xa, xb)
    else:
        cross = _trace_sqrt(_sqrtm_psd(_cov(xb)), _cov(xa))
    return max(float((mu_a - mu_b).pow(2).sum() + tr_a + tr_b - 2 * cross), 0.0)


def frechet_distance_reference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Plain D-space FD (Σ_a^½ Σ_b Σ_a^½), the reference of :func:`frechet_distance`."""
    a, b = a.double(), b.double()
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    fd = (a.mean(0) - b.mean(0)).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * _trace_sqrt(_sqrtm_psd(s_a), s_b)
    return max(float(fd), 0.0)


class FrechetBootstrap:
    """FD of a row's features (n, D) to real features of the same prompts, on seeded prompt resamples.

    ``real`` is (k·n, D): real clip j shows the combination of prompt j mod n (k clips per prompt).
    """

    def __init__(self, real: torch.Tensor, n: int, reps: int, seed: int, device=None):
        if real.shape[0] % n:
            raise ValueError(f"{real.shape[0]} real clips are not a multiple of {n} prompts")
        self.n, self.reps, self.seed = n, reps, seed
        self.device = torch.device(device) if device is not None else real.device
        self.real = real.double().to(self.device)
        d = real.shape[1]
        self.samples = _sample_space(n, real.shape[0], d)
        self.idx = bootstrap_indices(n, reps, seed).to(self.device) if n >= 2 and reps > 0 else None
        self.mu, self.trace, self.ref = [], [], []      # per chunk: mean, tr Σ, centred samples or Σ^½
        grouped = self.real.reshape(-1, n, d)                                  # (k, n, D)
        for lo in range(0, reps if self.idx is not None else 0, CHUNK):
            sel = grouped[:, self.idx[lo:lo + CHUNK]]                          # (k, c, n, D)
            mu, xc, tr = _moments(sel.permute(1, 0, 2, 3).reshape(sel.shape[1], -1, d))
            self.mu.append(mu)
            self.trace.append(tr)
            self.ref.append(xc if self.samples else _sqrtm_psd(_cov(xc)))

    def point(self, feats: torch.Tensor) -> float:
        """FD on all prompts."""
        return frechet_distance(feats.double().to(self.device), self.real)

    def replicates(self, feats: torch.Tensor) -> list[float]:
        """FD on each resample (empty for fewer than 2 prompts or no resamples)."""
        if self.idx is None:
            return []
        f = feats.double().to(self.device)
        if f.shape[0] != self.n:
            raise ValueError(f"features of {f.shape[0]} clips for {self.n} prompts")
        out = []
        for k, lo in enumerate(range(0, self.reps, CHUNK)):
            mu_a, xa, tr_a = _moments(f[self.idx[lo:lo + CHUNK]])
            cross = _trace_sqrt_samples(xa, self.ref[k]) if self.samples else _trace_sqrt(self.ref[k], _cov(xa))
            fd = (mu_a - self.mu[k]).pow(2).sum(-1) + tr_a + self.trace[k] - 2 * cross
            out += fd.clamp_min(0).cpu().tolist()
        return out
