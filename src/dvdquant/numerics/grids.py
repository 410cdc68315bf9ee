"""Uniform integer grids: weight (per-channel / per-group, asymmetric or symmetric) and
activation (per-token, symmetric) quantize / dequantize.

Conventions shared by every execution path (simulated, emulated, FP8 kernels), so that fast
paths can be checked bit-exactly against these functions:

* Weights, b bits: unsigned codes ``q`` in ``[0, 2^b - 1]`` (uint8), an integer-valued zero
  point ``z`` in the same range and an fp32 step ``Δ`` per row or per (row, group)::

      Ŵ[n, k] = Δ[n, g(k)] · (q[n, k] − z[n, g(k)]),   g(k) = k // group_size

  Symmetric grids are the special case ``z = 2^(b-1)`` (so ``q − z ∈ [−2^(b-1), 2^(b-1) − 1]``).
  For b = 4, ``q − z ∈ [−15, 15]``: every value is exact in FP8 e4m3.
* Activations, b ∈ {4, 6, 8} bits, per token (row of the flattened ``(M, K)`` input)::

      s = amax(|x|) / qmax,  qmax = 2^(b-1) − 1,   x_q = clamp(round_half_even(x / s), −qmax, qmax)

  (``s = 1`` for an all-zero token). FP8 e4m3 activations use ``s = amax / 448`` and the cast
  ``(x / s).to(float8_e4m3fn)`` (round to nearest even, no saturation needed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError, NonFiniteError
from .reduce import absmax

FP8_E4M3_MAX = 448.0
_MIN_NORMAL_SCALE = 2.0 ** -126      # smallest normal fp32: a scale at least this is rounded to 24 bits


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` if ``t`` holds NaN or Inf."""
    if not torch.isfinite(t).all():
        n_bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteError(f"{what} holds {n_bad} NaN/Inf value(s); refusing to quantize it")


WEIGHT_ONLY_BITS = 16


def is_weight_only(a_bits: int) -> bool:
    """A16 means weight-only: the activations stay in floating point and δ-GBS never switches the layer.
    The one place that rule is written (QuantLinear, the kernels' planner and the FP8 op ask here)."""
    return a_bits >= WEIGHT_ONLY_BITS


def call_bits(a_bits: int, override: Optional[int]) -> int:
    """A call's activation bits for a layer configured with ``a_bits``: the step's ``override`` (δ-GBS;
    None or negative: none), except that a weight-only layer keeps its A16."""
    if is_weight_only(a_bits) or override is None or override < 0:
        return a_bits
    return override


def act_qmax(bits: int) -> int:
    """Largest code of a symmetric ``bits``-bit activation grid (4 → 7, 8 → 127)."""
    if bits not in (2, 3, 4, 5, 6, 7, 8):
        raise ConfigError(f"activation bits must be in 2..8 for an integer grid, got {bits}")
    return 2 ** (bits - 1) - 1


@dataclass
class WeightQParams:
    """A quantized weight: codes (N, K) uint8, scale and zero (N, G) fp32, G = K / group_size."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: Optional[int] = None  # None: one group per row (per output channel)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]


def _group_view(w: torch.Tensor, group_size: Optional[int]) -> torch.Tensor:
    """(N, K) → (N·G, gs) rows, one per quantization group."""
    n, k = w.shape
    gs = k if group_size is None else group_size
    if k % gs != 0:
        raise ConfigError(f"in_features {k} is not a multiple of group_size {gs}")
    return w.reshape(n * (k // gs), gs)


def weight_codes_from_params(w_rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                             bits: int) -> torch.Tensor:
    """Round rows ``(R, gs)`` onto the grid given per-row ``scale``/``zero`` ``(R, 1)``: fp32 codes."""
    qmax = 2 ** bits - 1
    return torch.clamp(torch.round(w_rows / scale) + zero, 0, qmax)


def _params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """Per-row scale/zero (R, 1) from clipping bounds lo ≤ 0 ≤ hi."""
    qmax = 2 ** bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        amax = torch.maximum(-lo, hi)
        scale = amax / (half - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, float(half))
        return scale, zero
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero


def quantize_weight_with_range(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int,
                               group_size: Optional[int] = None, symmetric: bool = False
                               ) -> WeightQParams:
    """Quantize ``w`` (N, K) with per-group clipping bounds ``lo``/``hi`` of shape (N·G, 1)."""
    rows = _group_view(w.float(), group_size)
    scale, zero = _params_from_range(lo, hi, bits, symmetric)
    codes = weight_codes_from_params(rows, scale, zero, bits)
    n, k = w.shape
    g = rows.shape[0] // n
    return WeightQParams(codes.reshape(n, k).to(torch.uint8), scale.reshape(n, g),
                         zero.reshape(n, g), bits, group_size)


def minmax_bounds(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row bounds (R, 1), widened to include 0 so that 0 is exactly on the grid."""
    lo = rows.amin(dim=1, keepdim=True).clamp(max=0.0)
    hi = rows.amax(dim=1, keepdim=True).clamp(min=0.0)
    return lo, hi


def quantize_weight_minmax(w: torch.Tensor, bits: int, group_size: Optional[int] = None,
                           symmetric: bool = False) -> WeightQParams:
    """Round-to-nearest on the min/max grid (the MinMax / RTN baseline)."""
    if w.dim() != 2:
        raise ConfigError(f"weight must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if not 2 <= bits <= 8:
        raise ConfigError(f"weight bits must be in 2..8, got {bits}")
    check_finite(w, "weight")
    lo, hi = minmax_bounds(_group_view(w.float(), group_size))
    return quantize_weight_with_range(w, lo, hi, bits, group_size, symmetric)


def dequantize_weight(p: WeightQParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ŵ = Δ · (q − z), shape (N, K)."""
    n, k = p.codes.shape
    g = p.scale.shape[1]
    q = p.codes.float().reshape(n, g, k // g)
    w = p.scale.unsqueeze(-1) * (q - p.zero.unsqueeze(-1))
    return w.reshape(n, k).to(dtype)


def quantize_act_per_token_int(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token quantization of ``x`` (..., K): int8 codes (..., K), fp32 scale (..., 1)."""
    qmax = act_qmax(bits)
    xf = x.float()
    amax = absmax(xf, -1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    codes = torch.clamp(torch.round(xf / scale), -qmax, qmax)
    return codes.to(torch.int8), scale


def fake_quant_act_per_token_int(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize per token on the symmetric int grid; fp32 out."""
    return fake_quant_act_rows(x, bits, "int")


def fake_quant_act_rows(x: torch.Tensor, bits: int, fmt: str = "int", amax: Optional[torch.Tensor] = None,
                        lam: Optional[torch.Tensor] = None, overwrite: bool = False) -> torch.Tensor:
    """``codes.float() * scale`` of :func:`quantize_act_per_token_int` (``fmt="int"``) or of
    :func:`quantize_act_per_token_fp8_e4m3` (``"fp8"``, ``bits`` ignored) for each row of ``x``
    (..., C): the same bits, as a fresh fp32 tensor, without the int8 / float8 round trip.
    ``overwrite``: ``x`` is the caller's scratch; if fp32 it is computed in place and returned.

    ``lam`` (1, C) fp32, optional: quantize the rows of ``x / lam`` and multiply the result by
    ``lam`` (ARQ's channel balance), i.e. ``fake_quant(x / lam) * lam``. ``amax``: max |x| per
    row (..., 1), if the caller has it (only without ``lam``). Integer codes are the int8 codes
    as floats: after the clamp they are integers in [−qmax, qmax]; the one value the int8 cast
    changes is NaN, which only 0/0 produces here (a row whose scale underflowed to 0), and which
    that cast maps to 0 (checked on CPU, done always elsewhere). On the CPU, when every row's scale is
    a normal fp32 number, |x / s| ≤ qmax·(1 + 2^-23) for the row's own max (``amax`` must be it), so the
    clamp is skipped there: rounding already lands in [−qmax, qmax]. FP8 codes are rounded by
    :func:`round_to_e4m3_`. Zero codes may differ from the casts' in sign only (−0 from below
    for int codes, +0 for e4m3), which no later product or sum tells apart.
    """
    xf = x.float()
    own = overwrite or xf is not x                                          # a buffer this call may write
    if lam is not None:
        xf, own = (xf.div_(lam) if own else xf / lam), True
    if amax is None or lam is not None:
        amax = absmax(xf, -1, keepdim=True)
    qmax = FP8_E4M3_MAX if fmt == "fp8" else act_qmax(bits)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    t = xf.div_(scale) if own else xf / scale                              # one buffer, written in place
    if fmt == "fp8":
        round_to_e4m3_(t)                                                   # = .to(float8_e4m3fn).float()
    elif t.device.type == "cpu" and bool(scale.amin() >= _MIN_NORMAL_SCALE):
        t.round_()                                  # |t| ≤ qmax·(1 + 2^-23): the clamp would change nothing
    else:
        t.round_().clamp_(-qmax, qmax)
        if t.device.type != "cpu" or not bool((scale > 0).all()):
            t.nan_to_num_(0.0)
    t.mul_(scale)
    return t if lam is None else t.mul_(lam)


def quantize_act_per_token_fp8_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 e4m3 with ``s = amax / 448``: float8_e4m3fn codes (..., K), fp32 scale (..., 1)."""
    xf = x.float()
    amax = absmax(xf, -1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    return (xf / scale).to(torch.float8_e4m3fn), scale


def round_to_e4m3_(x: torch.Tensor, work: Optional[torch.Tensor] = None, saturate: bool = True) -> torch.Tensor:
    """Round fp32 ``x`` in place to the values of ``x.to(torch.float8_e4m3fn).float()``, without the
    float8 round trip: round to nearest even onto the e4m3 grid (3 mantissa bits, subnormal step
    2^-9), saturating at ±448 as that cast does (Inf too); NaN stays NaN.
    Zeros come out +0 (the cast keeps −0), which no later product or sum tells apart.

    ``(x + m) − m`` with m = 1.5·2^(e + 20), 2^e = the power of two of |x| clamped to [2^-6, 2^9]
    (taken from the exponent bits), rounds x to a multiple of 2^(e − 3) in two IEEE operations
    (the sum lands in a binade whose ulp is that step). ``work``: an int32 buffer of x's shape to
    build m in (saves an allocation in loops); ``saturate=False`` skips the final clamp, for
    callers whose |x| ≤ 448 already (it changes nothing there).
    """
    bits = torch.bitwise_and(x.view(torch.int32), 0x7F800000, out=work)
    magic = bits.view(torch.float32).clamp_(2.0 ** -6, 2.0 ** 9).mul_(1.5 * 2 ** 20)
    x.add_(magic).sub_(magic)
    return x.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX) if saturate else x


def fake_quant_act_per_token_fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize per token to FP8 e4m3 with ``s = amax / 448``; fp32 out."""
    return fake_quant_act_rows(x, 8, "fp8")


def weight_int_max(bits: int) -> int:
    """Largest |q − z| of a ``bits``-bit weight grid (4 → 15): bounds the exact code GEMM."""
    return 2 ** bits - 1
