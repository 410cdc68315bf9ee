"""EMULATED execution: the integer pipeline of a quantized linear, spelled out in plain torch.

Why this exists: it is the path every machine can run (CPU in CI, any GPU), and it states in
code exactly what the fast paths compute, as *integers plus scales*, not as fake-quantized
floats. It is bit-identical to ``QuantLinear.forward_simulated`` (the tests assert
``torch.equal``), because it performs the same fp32 operations in the same order; only the
intermediate representation differs (codes and scales are materialised).

The pipeline, for flattened tokens ``x`` (M, K) and a layer with N outputs:

1. transform: ``x ← (x / smooth_t) · H`` (static smoothing row for step t, block-diagonal
   Hadamard rotation), fp32 — done by the layer (``QuantLinear.transform_input``), which passes the
   transformed tokens, λ and the scale block in (:mod:`dvdquant.nn.execution`).
2. channel balance (optional): ``x ← x / λ`` with λ (G, K) from ARQ ``per_channel`` auto-scaling
   (absmax per channel of each sample's tokens: G samples, :mod:`dvdquant.numerics.samples`) or
   λ (1, K), a calibrated ``act_balance`` row.
3. quantize per token, or per (token, ``scale_block`` channels) for ARQ ``per_block``::

       int grid, b bits:  s = amax/qmax, c = clamp(round_half_even(x/s), −qmax, qmax)  (int8)
       FP8 e4m3:          s = amax/448,  c = fp8_e4m3(x/s)                            (float8)

4. weights: ``W_int = q − z`` (integers, [−15, 15] for 4 bits), ``Ŵ = Δ ⊙ W_int``.
5. per-token scales, per-channel Δ, no λ: ``y = ((Σ_k c·W_int) · Δ) · s + b`` with the code sum
   exact (:func:`dvdquant.numerics.linear.linear_per_token_per_channel`, the FP8 GEMM's
   epilogue order); otherwise ``y = ((c · s) · λ) @ Ŵᵀ + b`` in fp32, one GEMM per sample (a float
   GEMM's rounding may depend on its row count). Cast to the input dtype.

Dynamic smoothing (per-token layers, :func:`emulated_dynamic_linear`): the tokens are divided by their
sample's s_g before step 1, and step 4 is each sample's re-quantized weight
(:func:`requant_weight_reference`, the reference of :mod:`.weight_requant`), one code GEMM per sample.

The Hopper path (:mod:`dvdquant.kernels.fp8`) runs steps 1–3 in one Triton kernel and step 5
as an FP8 GEMM with the scales in its epilogue; for A4 (≤ 5-bit int codes) with per-token
scales it computes the same bits as this path (exact rotation, exact integer GEMM, same
epilogue order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..numerics import grids
from ..numerics.linear import linear_per_token_per_channel
from ..numerics.packing import unpack_int4
from ..numerics.samples import matmul_per_sample, rows_per_sample, scale_per_sample
from ..numerics.smoothing import CHUNK_ELEMENTS, decode_master, per_sample_weight_params, smoothed_weight_params


@dataclass
class QuantizedActivations:
    """Activation codes and their scales.

    ``codes`` (M, K): int8 integer codes (``fmt == "int"``) or float8_e4m3fn values (``"fp8"``).
    ``scale`` (M, G) fp32, one per token and ``block`` channels (G = K // block).
    ``lam`` (G, K) fp32 or None: per-channel balance of each of the G samples (a (1, K) row serves
    them all), multiplied back after dequantization.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    block: int
    fmt: str
    lam: Optional[torch.Tensor] = None

    def dequantize(self) -> torch.Tensor:
        """x̂ (M, K) fp32, with the same operation order as the simulated path."""
        m, k = self.codes.shape
        g = k // self.block
        xq = (self.codes.float().reshape(m, g, self.block) * self.scale.reshape(m, g, 1)).reshape(m, k)
        return xq if self.lam is None else scale_per_sample(xq, self.lam, False)


@dataclass(frozen=True)
class QuantWeight:
    """A layer's weight codes: ``qweight`` (N, K) uint8, or (N, K/2) two per byte when ``packed``;
    ``w_scale`` Δ and ``w_zero`` z (N, G) fp32; ``w_bits`` the grid's bits."""

    qweight: torch.Tensor
    w_scale: torch.Tensor
    w_zero: torch.Tensor
    w_bits: int
    packed: bool

    def integer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q − z) as fp32 integers (N, K) and Δ (N, G) fp32."""
        codes = unpack_int4(self.qweight) if self.packed else self.qweight
        n, k = codes.shape
        g = self.w_scale.shape[1]
        w_int = codes.float().reshape(n, g, k // g) - self.w_zero.unsqueeze(-1)
        return w_int.reshape(n, k), self.w_scale

    def dequantized(self) -> torch.Tensor:
        """Ŵ = Δ ⊙ (q − z), (N, K) fp32 (same products as ``grids.dequantize_weight``)."""
        w_int, scale = self.integer()
        n, k = w_int.shape
        g = scale.shape[1]
        return (scale.unsqueeze(-1) * w_int.reshape(n, g, k // g)).reshape(n, k)


def quantize_rows(x: torch.Tensor, bits: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of fp32 ``x`` (R, C): codes (R, C) and scale (R, 1) (grids contract)."""
    if fmt == "fp8":
        return grids.quantize_act_per_token_fp8_e4m3(x)
    return grids.quantize_act_per_token_int(x, bits)


def quantize_activations(x2: torch.Tensor, bits: int, fmt: str = "int", lam: Optional[torch.Tensor] = None,
                         block: Optional[int] = None) -> QuantizedActivations:
    """Steps 2–3 on transformed fp32 tokens (M, K): rows of ``x2 / lam`` when a balance λ (G, K) is
    given (one row per sample, or (1, K)), else one scale per token and ``block`` channels (None: K)."""
    m, k = x2.shape
    if lam is not None:
        codes, scale = quantize_rows(scale_per_sample(x2, lam, True), bits, fmt)
        return QuantizedActivations(codes, scale, k, fmt, lam)
    block = block or k
    codes, scale = quantize_rows(x2.reshape(m * (k // block), block), bits, fmt)
    return QuantizedActivations(codes.reshape(m, k), scale.reshape(m, k // block), block, fmt)


def emulated_linear(xt: torch.Tensor, samples: int, bits: int, weight: QuantWeight, bias: Optional[torch.Tensor],
                    fmt: str = "int", lam: Optional[torch.Tensor] = None, block: Optional[int] = None) -> torch.Tensor:
    """Steps 2–5 on transformed, finite fp32 tokens ``xt`` (M, K) of ``samples`` batch elements → (M, N) fp32;
    bit-identical to ``QuantLinear.forward_simulated``. Weight-only ``bits`` (A16): ``xt`` unquantized."""
    if not grids.is_weight_only(bits):
        qa = quantize_activations(xt, bits, fmt, lam, block)
        if qa.lam is None and qa.block == xt.shape[1] and weight.w_scale.shape[1] == 1:
            w_int, delta = weight.integer()
            pmax = None if qa.fmt == "fp8" else grids.act_qmax(bits) * grids.weight_int_max(weight.w_bits)
            return linear_per_token_per_channel(qa.codes, qa.scale, w_int, delta, bias, pmax)
        xt = qa.dequantize()
    y = matmul_per_sample(xt, weight.dequantized(), samples)                    # (M, N), one GEMM per sample
    if bias is not None:
        y = y + bias.float()
    return y


# ------------------------------------------------------------------------------ dynamic smoothing
def requant_weight_reference(master: torch.Tensor, master_scale: torch.Tensor, colmax: torch.Tensor,
                             s: torch.Tensor, *, bits: int, symmetric: bool, rotation_block: Optional[int],
                             codes_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of :func:`dvdquant.kernels.weight_requant.requant_weight`: per sample (row of ``s``
    (G, K)), (q − z) (G·N, K) in ``codes_dtype`` and Δ (G·N, 1) of Q_minmax(W·diag(s_g)·H), group None —
    :func:`dvdquant.numerics.smoothing.smoothed_weight_params` itself (NaN/Inf: NonFiniteError)."""
    p = smoothed_weight_params(decode_master(master, master_scale, colmax), s, rotation_block, bits, None, symmetric)
    return (p.codes.float() - p.zero).to(codes_dtype), p.scale


def emulated_dynamic_linear(xt: torch.Tensor, s: torch.Tensor, bits: int, fmt: str, master: torch.Tensor,
                            master_scale: torch.Tensor, colmax: torch.Tensor, w_bits: int, symmetric: bool,
                            rotation_block: Optional[int], bias: Optional[torch.Tensor],
                            chunk_elems: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Dynamic smoothing's integer pipeline (the FP8 path's order) on finite tokens ``xt`` (M, K) already
    divided by their sample's ``s`` (G, K) and rotated: per-token codes, each sample's weight as
    :func:`requant_weight_reference` gives it (:func:`~dvdquant.numerics.smoothing.per_sample_weight_params`,
    in chunks of ≤ ``chunk_elems`` weight entries: same bits), one exact code GEMM per sample with the epilogue
    ((acc · Δ_g) · s) + b → (M, N) fp32."""
    codes, scale = quantize_rows(xt, bits, fmt)
    pmax = None if fmt == "fp8" else grids.act_qmax(bits) * grids.weight_int_max(w_bits)
    g = s.shape[0]
    weights = per_sample_weight_params(decode_master(master, master_scale, colmax), s, rotation_block, w_bits, None,
                                       symmetric, chunk_elems)
    return torch.cat([linear_per_token_per_channel(c, sc, p.codes.float() - p.zero, p.scale, bias, pmax)
                      for c, sc, p in zip(rows_per_sample(codes, g), rows_per_sample(scale, g), weights)])
