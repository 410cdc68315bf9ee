"""Orthogonal Hadamard matrices for every hidden size the video DiTs use.

Hidden sizes are a power of two times a small factor (3072 = 12·256, 5120 = 20·256,
1920 = 60·32, 13824 = 108·128, 8960 = 140·64, 21504 = 84·256 …). We build
``H_n = H_base ⊗ H_{2^a}`` where ``H_{2^a}`` is Sylvester's and ``H_base`` comes from a
Paley construction on a prime q:

* Paley I  (q ≡ 3 mod 4): order q + 1,
* Paley II (q ≡ 1 mod 4): order 2(q + 1).

Matrices are returned normalised (``H Hᵀ = I``). Sizes with no construction here (e.g. 52)
can still be rotated block-diagonally with the largest constructible block that divides them.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from ..errors import ConfigError


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    i = 2
    while i * i <= q:
        if q % i == 0:
            return False
        i += 1
    return True


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = Legendre symbol of (j − i) mod q (0 on the diagonal)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).view(1, -1) - torch.arange(q).view(-1, 1)) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    qm = _jacobsthal(q)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = qm
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    qm = _jacobsthal(q)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = 1.0
    s[1:, 1:] = qm
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(s, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _base_kind(m: int) -> Optional[str]:
    """Which construction gives a base matrix of order m ("trivial", "paley1", "paley2"), if any."""
    if m in (1, 2):
        return "trivial"
    if m % 4 != 0:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1"
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def _base_matrix(m: int) -> Optional[torch.Tensor]:
    """An unnormalised ±1 Hadamard matrix of order m from Paley, or None."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if m % 4 != 0:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


def _decompose(n: int) -> Optional[tuple[int, int]]:
    """n = base · 2^a with a constructible base; prefer the smallest base."""
    if n < 1:
        return None
    p2 = 1
    candidates = []
    while n % p2 == 0:
        candidates.append((n // p2, p2))
        p2 *= 2
    for base, pow2 in sorted(candidates):
        if _base_kind(base) is not None:
            return base, pow2
    return None


def can_build_hadamard(n: int) -> bool:
    """Whether :func:`hadamard_matrix` can build an order-``n`` matrix."""
    return _decompose(n) is not None


@lru_cache(maxsize=32)
def _hadamard_f64(n: int) -> torch.Tensor:
    dec = _decompose(n)
    if dec is None:
        raise ConfigError(f"no Hadamard construction for size {n} (need 2^a · m with a Paley order m)")
    base, pow2 = dec
    h = _base_matrix(base)
    syl = torch.ones(1, 1, dtype=torch.float64)
    two = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while syl.shape[0] < pow2:
        syl = torch.kron(syl, two)
    return torch.kron(h, syl) / (n ** 0.5)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Normalised (orthogonal) Hadamard matrix of order ``n``."""
    return _hadamard_f64(n).to(dtype=dtype, device=device)


def largest_hadamard_block(n: int, limit: Optional[int] = None) -> int:
    """Largest constructible order b dividing n (and ≤ limit, if given)."""
    divisors = [b for b in range(1, n + 1) if n % b == 0 and (limit is None or b <= limit)]
    return max(b for b in divisors if can_build_hadamard(b))


def block_hadamard(n: int, block: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Dense block-diagonal (n, n) matrix with order-``block`` Hadamard blocks."""
    if n % block != 0:
        raise ConfigError(f"Hadamard block {block} does not divide size {n}")
    return torch.block_diag(*([hadamard_matrix(block, torch.float64)] * (n // block))).to(dtype=dtype, device=device)


def rotate_last_dim(x: torch.Tensor, h_block: torch.Tensor) -> torch.Tensor:
    """x (..., n) · blockdiag(h_block, …): each consecutive ``b``-slice times h_block (b, b)."""
    b = h_block.shape[0]
    n = x.shape[-1]
    if n % b != 0:
        raise ConfigError(f"Hadamard block {b} does not divide the last dimension {n}")
    xs = x.reshape(*x.shape[:-1], n // b, b)
    return (xs @ h_block.to(dtype=x.dtype, device=x.device)).reshape(x.shape)


@lru_cache(maxsize=64)
def _factors_f64(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised Kronecker factors (A: base×base, B: p2×p2) with H_n = A ⊗ B."""
    base, pow2 = _decompose(n) or (None, None)
    if base is None:
        raise ConfigError(f"no Hadamard construction for size {n} (need 2^a · m with a Paley order m)")
    return hadamard_matrix(base, torch.float64), hadamard_matrix(pow2, torch.float64)


def hadamard_rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (..., n) · blockdiag(H_block, …) without forming H: O(n·(base + 2^a)) work per row.

    With H_block = A ⊗ B and each block segment v viewed as V (base, 2^a): v·H = vec(Aᵀ V B).
    """
    n = x.shape[-1]
    if n % block != 0:
        raise ConfigError(f"Hadamard block {block} does not divide the last dimension {n}")
    a, b = _factors_f64(block)
    a, b = a.to(dtype=x.dtype, device=x.device), b.to(dtype=x.dtype, device=x.device)
    v = x.reshape(*x.shape[:-1], n // block, a.shape[0], b.shape[0])
    y = torch.matmul(a.t(), torch.matmul(v, b))          # (..., n/block, base, p2)
    return y.reshape(x.shape)
