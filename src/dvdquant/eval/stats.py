"""Paired differences with 95 % intervals, plain Python (no scipy), deterministic.

* :func:`paired_interval` — mean of ``a[i] − b[i]`` over the same prompt + noise with a Student-t
  interval (``t_{1−α/2, n−1} · sd / √n``); :func:`mean_interval` the same for one sample;
* :func:`bootstrap_interval` — the statistic ± z · SD of its bootstrap replicates (the Fréchet
  distance, :mod:`dvdquant.eval.frechet`, resamples prompts with :func:`bootstrap_indices`, seeded);
  :func:`percentile_interval` — percentiles of the replicates;
* :func:`verdict` — "better" / "worse" only when the interval excludes 0, else "inside the noise";
* :func:`prompts_needed` — n ≈ (z · sd / h)² for a half-width h.

The t quantile inverts the regularized incomplete beta function (continued fraction, bisection);
it matches tables to 1e-9.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch

LEVEL = 0.95
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    mean: float                 # point estimate (mean difference, or the statistic on all prompts)
    lo: float
    hi: float
    n: int                      # prompts (pairs)
    sd: Optional[float] = None  # SD of the per-prompt values / differences (t), of the replicates (bootstrap)
    method: str = "t"           # "t" (Student-t, paired) or "bootstrap" (normal, over prompt resamples)

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "half_width": self.half_width}

    @classmethod
    def from_dict(cls, d: dict) -> "Interval":
        nan = float("nan")
        return cls(*(nan if d.get(k) is None else d[k] for k in ("mean", "lo", "hi")), d["n"], d.get("sd"),
                   d.get("method", "t"))


# ----------------------------------------------------------------------------- Student t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| > t) for Student's t with ``df`` degrees of freedom."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The p-quantile (p in (0.5, 1)) of Student's t with ``df`` degrees of freedom."""
    if not 0.5 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df > 0, got p={p}, df={df}")
    tail = 2.0 * (1.0 - p)
    lo, hi = 0.0, 2.0
    while t_two_sided_p(hi, df) > tail:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_two_sided_p(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


# ----------------------------------------------------------------------------- intervals
def _floats(x) -> list[float]:
    if isinstance(x, torch.Tensor):
        return [float(v) for v in x.double().flatten()]
    return [float(v) for v in x]


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of ``values`` with a Student-t interval (nan bounds for fewer than 2 values)."""
    v = _floats(values)
    n = len(v)
    if n == 0:
        nan = float("nan")
        return Interval(nan, nan, nan, 0, None)
    mean = math.fsum(v) / n
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), n, None)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in v) / (n - 1))
    h = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - h, mean + h, n, sd)


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of a[i] − b[i] (same prompt and noise) with a paired Student-t interval."""
    a, b = _floats(a), _floats(b)
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return mean_interval([x - y for x, y in zip(a, b)], level)


def verdict(iv: Interval, higher_is_better: bool = True) -> str:
    """'better' / 'worse' for the first of the pair when the interval excludes 0, else 'inside the noise'."""
    if not (math.isfinite(iv.lo) and math.isfinite(iv.hi)):
        return "not enough prompts"
    if not iv.excludes_zero():
        return "inside the noise"
    return "better" if (iv.lo > 0) == higher_is_better else "worse"


def prompts_needed(sd: float, half_width: float = 0.3, z: float = Z95) -> int:
    """Prompts for a paired interval of ±``half_width`` given the SD of the differences (normal approx.)."""
    return max(2, math.ceil((z * sd / half_width) ** 2))


# ----------------------------------------------------------------------------- bootstrap
def bootstrap_indices(n: int, reps: int, seed: int) -> torch.Tensor:
    """(reps, n) indices drawn with replacement from range(n); the same for the same (n, reps, seed)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, n, (reps, n), generator=g)


def normal_quantile(p: float) -> float:
    """The p-quantile of the standard normal distribution (bisection on erf)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"normal_quantile needs 0 < p < 1, got {p}")
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if 0.5 * math.erfc(-mid / math.sqrt(2.0)) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def bootstrap_interval(point: float, replicates: Sequence[float], n: int, level: float = LEVEL) -> Interval:
    """Normal bootstrap interval: the statistic on all prompts ± z · SD of its bootstrap replicates.

    Centred on ``point`` on purpose: a resample repeats prompts, which biases a covariance-based
    statistic such as the Fréchet distance upward, so replicate percentiles can miss the point.
    """
    r = [x for x in _floats(replicates) if math.isfinite(x)]
    if len(r) < 2:
        nan = float("nan")
        return Interval(point, nan, nan, n, None, "bootstrap")
    m = math.fsum(r) / len(r)
    sd = math.sqrt(math.fsum((x - m) ** 2 for x in r) / (len(r) - 1))
    h = normal_quantile(0.5 + level / 2.0) * sd
    return Interval(point, point - h, point + h, n, sd, "bootstrap")


def percentile_interval(point: float, replicates: Sequence[float], n: int, level: float = LEVEL) -> Interval:
    """Percentile bootstrap interval of the replicates around the statistic ``point`` on all prompts."""
    r = torch.tensor([x for x in _floats(replicates) if math.isfinite(x)], dtype=torch.float64)
    if r.numel() < 2:
        nan = float("nan")
        return Interval(point, nan, nan, n, None, "bootstrap")
    q = torch.quantile(r, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return Interval(point, float(q[0]), float(q[1]), n, None, "bootstrap")
