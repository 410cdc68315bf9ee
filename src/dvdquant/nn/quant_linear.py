"""QuantLinear: a Linear layer with integer-grid weights and dynamically quantized activations.

One module serves every method (DVD-Quant, its ablations and the baselines); they differ only
in what they put into it:

* ``qweight``: weight codes (N, K) on the unsigned grid of :mod:`dvdquant.numerics.grids`,
  packed two per byte (N, K/2) when ``w_bits == 4``; ``w_scale``/``w_zero`` (N, G) fp32.
  The weight has already absorbed the input transforms below (W·diag(smooth)·H).
* ``smooth`` (T, K) fp32, optional: a static per-input-channel divisor (SmoothQuant, T = 1) or
  one per calibrated denoising step (ViDiT-Q-style, T steps, row picked by the step index).
* ``rotation_block``: online Hadamard rotation x·H of the activations (block-diagonal with
  blocks of this order; equal to K for a full rotation). W was rotated offline the same way.
* ``auto_scale``: ARQ's run-time channel scaling Λ_t from the current tokens' absmax:
  ``per_channel`` (exact form: Λ_t (1, K) per sample, see below), ``per_block`` (one scale per
  token and ``scale_block`` channels, the GEMM-friendly form) or ``none``.
* ``act_balance`` (T, K) fp32, optional: a *calibrated* per-step channel balance used like Λ_t
  (ViDiT-Q-style timestep-aware balancing; replaces ``auto_scale`` when present).
* ``dyn_alpha`` (optional, DVD-Quant ``smoothing="dynamic"``): run-time smoothing *before* the
  rotation, s_t = Λ_t^α / max|W_j|^(1−α) with Λ_t the sample's per-channel absmax; the
  activations become x/s_t and the weight W·diag(s_t)·H is re-quantized (RTN on the layer's grid)
  every forward, once per sample, from a master copy ``w_master`` (int8 codes of W/max|W_j| with a
  per-row scale, or float), and each sample's tokens meet their own weight. The weight's rotation is
  the exact one of the activations (snapped, exact ±1 sums), so a sample's Ŵ_t has the same bits
  however many samples are re-quantized together (they are, in chunks of ≤ 2^24 elements). Per
  layer, step and sample that is O(N·K·log K) work beside the GEMM's O(L·N·K); it costs master-weight memory.
  Such a layer's ``qweight`` holds Q_RTN(W_master·H), its weight at s = 1, which its weight-only (A16)
  calls use. With per-token activation scales each sample's product is taken in the code-GEMM order
  below against its own (q_g − z_g, Δ_g); such layers (int8 master, a rotation the kernels fuse, no
  groups) also run on the emulated and fp8 backends (:mod:`dvdquant.nn.execution`), the others only here.
* ``w_block_sum`` (N, K/R) fp32, optional (DVD-Quant ``mean_channel="exact"``): the mean of each
  rotation block of R input channels is kept out of the quantizers. With x̄ (M, K/R) the block means
  of the tokens and x_c = x − x̄ (each block centred), y = f(x_c) + x̄·w_block_sumᵀ, where f is the
  quantized product below (bias included) and w_block_sum holds each row's block sums of the FP
  weight; qweight then encodes the block-centred weight (W − its block means)·H, whose constant
  Hadamard column is 0. The mean term is one small fp32 GEMM per sample, and x̄ is a per-token mean.
* activations are then quantized per token to ``a_bits`` (the shared :class:`RuntimeState`
  may override it per step: δ-GBS). ``a_bits=16`` makes the layer *weight-only* (W·A16, e.g.
  AdaLN modulation layers): its activations stay in floating point whatever the override says.

Run-time statistics are **per sample** (:mod:`dvdquant.numerics.samples`): an input (B, ..., K)
with ≥ 3 dims has B samples and Λ_t / s_t are taken over each sample's tokens only, so a prompt's
output does not depend on the other prompts of its batch or on the other half of classifier-free
guidance (diffusers video transformers call their block Linears with (B, L, K)). A 2-D input
(M, K) is one sample. Float GEMMs of the fake-quant order run one per sample (a GEMM's rounding
may depend on its row count); the exact code GEMM below is batch-independent by construction.

``forward`` here is the *simulated* path: fp32 fake quantization that computes exactly what
the integer pipeline computes (x̂ = s·x_q, Ŵ = Δ·(q − z), y = x̂ Ŵᵀ + b). Faster execution
paths live in :mod:`dvdquant.kernels` and are checked against this one. Two definitions make
the paths agree bit for bit rather than to fp32 rounding (see :mod:`dvdquant.numerics.hadamard`
and :mod:`dvdquant.numerics.linear`):

* the online rotation is :func:`~dvdquant.numerics.hadamard.hadamard_rotate_exact` (snapped
  input, exact ±1 sums, one · 1/√R), which the fused Triton kernel reproduces exactly;
* with per-token activation scales and per-channel weight steps (no per-channel Λ, no
  groups) the product is ``((Σ c·W_int) · Δ) · s + b`` with an exact code sum: the order of
  the FP8 GEMM's epilogue. Other layouts keep the fake-quant order ``(c·s·Λ) @ Ŵᵀ + b``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..errors import DVDQuantError, NonFiniteError
from ..kernels.execution import ExecutionConfig
from ..kernels.finite import layer_key
from ..numerics import grids
from ..numerics.hadamard import hadamard_rotate_exact
from ..numerics.linear import linear_per_token_per_channel
from ..numerics.packing import pack_int4, unpack_int4
from ..numerics.reduce import absmax
from ..numerics.scratch import scratch
from ..numerics.smoothing import CHUNK_ELEMENTS as SMOOTHED_CHUNK_ELEMENTS
from ..numerics.smoothing import decode_master, per_sample_weight_params, smoothed_weight_params, smoothing_scales
from ..numerics.samples import (matmul_per_sample, per_sample_absmax, rows_per_sample, sample_count,
                               scale_per_sample)
from .execution import forward as kernel_forward
from .state import RuntimeState
from .weight_cache import DecodedWeights

_SIMULATED = ExecutionConfig()


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, w_bits: int, group_size: Optional[int],
                 a_bits: int, a8_format: str = "int", rotation_block: Optional[int] = None,
                 auto_scale: str = "none", scale_block: int = 128, has_bias: bool = True,
                 smooth_steps: int = 0, balance_steps: int = 0, bias_dtype: torch.dtype = torch.float32,
                 exact_mean: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.group_size = w_bits, group_size
        self.a_bits, self.a8_format = a_bits, a8_format
        self.rotation_block, self.auto_scale, self.scale_block = rotation_block, auto_scale, scale_block
        self.packed = w_bits == 4 and in_features % 2 == 0
        groups = 1 if group_size is None else in_features // group_size
        kq = in_features // 2 if self.packed else in_features
        self.register_buffer("qweight", torch.zeros(out_features, kq, dtype=torch.uint8, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("w_zero", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("smooth", torch.ones(smooth_steps, in_features, device=device) if smooth_steps else None)
        # calibrated per-step channel balance (ViDiT-Q-style), applied around the quantizer only
        self.register_buffer("act_balance",
                             torch.ones(balance_steps, in_features, device=device) if balance_steps else None)
        if exact_mean and not rotation_block:
            raise DVDQuantError("an exact block-mean term (mean_channel='exact') needs a rotation_block")
        # W's block row sums for mean_channel="exact": y += x̄ · w_block_sumᵀ (None: the mean is quantized)
        self.register_buffer("w_block_sum", torch.zeros(out_features, in_features // rotation_block, device=device)
                             if exact_mean else None)
        # dynamic smoothing (off unless set_dynamic_smoothing is called)
        self.dyn_alpha: Optional[float] = None
        self.w_symmetric = False
        self.register_buffer("w_master", None)        # (N, K) int8 codes of W/colmax, or float W
        self.register_buffer("w_master_scale", None)  # (N, 1) fp32 row scale of the int8 codes
        self.register_buffer("w_colmax", None)        # (K,) fp32 max|W_j| of the master weight
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if has_bias else None
        self.state: Optional[RuntimeState] = None  # shared, set by quantize_ (not a submodule)
        self.layer_name = ""              # also sets name_key, the name as the FP8 ops take it
        self._decoded = DecodedWeights()  # fp32 decodings of the packed weight, never saved

    @property
    def layer_name(self) -> str:
        """The layer's qualified name in the model (log lines, errors, non-finite reports)."""
        return self.__dict__.get("_layer_name", self.__dict__.get("layer_name", ""))

    @layer_name.setter
    def layer_name(self, name: str) -> None:
        self._layer_name = name
        self.name_key = layer_key(name)   # (1,) int64 CPU tensor, a plain attribute: not saved, not moved

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_params(cls, linear: nn.Linear, wq: grids.WeightQParams, *, a_bits: int, a8_format: str = "int",
                    rotation_block: Optional[int] = None, auto_scale: str = "none", scale_block: int = 128,
                    smooth: Optional[torch.Tensor] = None,
                    act_balance: Optional[torch.Tensor] = None,
                    w_block_sum: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Build from an ``nn.Linear`` (for its bias) and already computed weight parameters
        (``w_block_sum``: the exact block-mean term's table, see the module docstring)."""
        dev = linear.weight.device
        m = cls(linear.in_features, linear.out_features, w_bits=wq.bits, group_size=wq.group_size,
                a_bits=a_bits, a8_format=a8_format, rotation_block=rotation_block, auto_scale=auto_scale,
                scale_block=scale_block, has_bias=linear.bias is not None,
                smooth_steps=0 if smooth is None else smooth.shape[0],
                balance_steps=0 if act_balance is None else act_balance.shape[0], bias_dtype=linear.weight.dtype,
                exact_mean=w_block_sum is not None, device=dev)
        m.set_weight_params(wq)
        if smooth is not None:
            m.smooth.copy_(smooth.to(dev, torch.float32))
        if act_balance is not None:
            m.act_balance.copy_(act_balance.to(dev, torch.float32))
        if w_block_sum is not None:
            if smooth is not None:
                raise DVDQuantError("an exact block-mean term cannot be combined with static smoothing")
            m.w_block_sum.copy_(w_block_sum.to(dev, torch.float32))
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.data)
        return m

    def set_weight_params(self, wq: grids.WeightQParams) -> None:
        codes = wq.codes.to(self.qweight.device)
        self.qweight.copy_(pack_int4(codes) if self.packed else codes)
        self.w_scale.copy_(wq.scale)
        self.w_zero.copy_(wq.zero)

    def set_dynamic_smoothing(self, w: torch.Tensor, alpha: float, master_bits: int = 8,
                              symmetric: bool = False) -> None:
        """Switch on run-time smoothing before the rotation; ``w`` (N, K) is the *unrotated* weight."""
        w = w.detach().float()
        self.w_colmax = w.abs().amax(dim=0)                           # (K,)
        if master_bits == 8:
            # int8 codes of W·diag(1/colmax) per row: columns are equalised first, so a small column
            # (one that reads a large activation channel) keeps its relative precision
            wn = w / self.w_colmax.clamp_min(1e-12)
            scale = (wn.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
            self.w_master = torch.clamp(torch.round(wn / scale), -127, 127).to(torch.int8)
            self.w_master_scale = scale                               # (N, 1)
        elif master_bits == 16:
            self.w_master, self.w_master_scale = w.clone(), None
        else:
            raise DVDQuantError(f"master_bits must be 8 or 16, got {master_bits!r}")
        self.dyn_alpha, self.w_symmetric = float(alpha), bool(symmetric)
        self.set_weight_params(self.smoothed_weight_params())        # the weight at s = 1 (weight-only steps)

    def empty_dynamic_smoothing(self, alpha: float, master_bits: int, symmetric: bool) -> None:
        """Dynamic smoothing with placeholder master buffers of the right shapes and dtypes, to be
        filled by ``load_state_dict`` (checkpoints; then :meth:`smoothed_weight_params` → ``set_weight_params``)."""
        n, k, dev = self.out_features, self.in_features, self.qweight.device
        if master_bits not in (8, 16):
            raise DVDQuantError(f"master_bits must be 8 or 16, got {master_bits!r}")
        eight = master_bits == 8
        self.w_master = torch.zeros(n, k, dtype=torch.int8 if eight else torch.float32, device=dev)
        self.w_master_scale = torch.ones(n, 1, device=dev) if eight else None
        self.w_colmax = torch.ones(k, device=dev)
        self.dyn_alpha, self.w_symmetric = float(alpha), bool(symmetric)

    def master_weight(self) -> torch.Tensor:
        """The dynamic-smoothing master weight (N, K) fp32, unrotated (a cached read-only decoding)."""
        if self.w_master_scale is None:
            return self.w_master.float()
        build = lambda: decode_master(self.w_master, self.w_master_scale, self.w_colmax)   # noqa: E731
        return self._decoded_cache().get("w_master", (self.w_master, self.w_master_scale, self.w_colmax), build)

    def dynamic_smoothing(self, x2: torch.Tensor, samples: int = 1) -> torch.Tensor:
        """s_t (G, K) = Λ_t^α / max|W_j|^(1−α) per sample of the tokens (M, K) (G = ``samples``,
        :mod:`~dvdquant.numerics.samples`; any float dtype: the maxima are exact); 1 where a sample's
        channel is all zero (:func:`~dvdquant.numerics.smoothing.smoothing_scales`)."""
        lam = self._all_tokens(per_sample_absmax(x2, samples).float())
        return smoothing_scales(lam, self.w_colmax, self.dyn_alpha)

    def smoothed_weight_params(self, s: Optional[torch.Tensor] = None) -> grids.WeightQParams:
        """Q_RTN(W·diag(s)·H) from the dynamic-smoothing master, for ``s`` (G, K) stacked row-wise ((G·N, K)
        codes); ``s=None``: s = 1, the weight that ``qweight`` / ``w_scale`` / ``w_zero`` hold for such a
        layer (checkpoints do not store them but rebuild them from the master on load). Every step is
        per row and exact-by-construction (min/max grid, exact rotation), so a row's bits do not depend
        on the other rows (:mod:`~dvdquant.numerics.smoothing`)."""
        return smoothed_weight_params(self.master_weight(), s, self.rotation_block, self.w_bits, self.group_size,
                                      self.w_symmetric)

    def smoothed_weight_param_list(self, s: torch.Tensor):
        """The per-sample weight parameters Q(W·diag(s_g)·H), one :class:`~dvdquant.numerics.grids.WeightQParams`
        (N rows) per row of ``s`` (G, K), in order, re-quantized in chunks of ≤ 2^24 elements (the chunking
        does not change bits)."""
        return per_sample_weight_params(self.master_weight(), s, self.rotation_block, self.w_bits, self.group_size,
                                        self.w_symmetric, SMOOTHED_CHUNK_ELEMENTS)

    def smoothed_weights(self, s: torch.Tensor):
        """Ŵ_t (N, K) fp32 dequantized, one per row of ``s`` (G, K), in order: the per-sample weights of
        dynamic smoothing (:meth:`smoothed_weight_param_list`)."""
        for p in self.smoothed_weight_param_list(s):
            yield grids.dequantize_weight(p, torch.float32)

    def smoothed_weight(self, s: torch.Tensor) -> torch.Tensor:
        """Ŵ_t (N, K) = Q_RTN(W·diag(s)·H) for one sample's ``s`` (K,), dequantized fp32."""
        return next(self.smoothed_weights(s.reshape(1, -1)))

    def weight_params(self) -> grids.WeightQParams:
        codes = unpack_int4(self.qweight) if self.packed else self.qweight
        return grids.WeightQParams(codes, self.w_scale, self.w_zero, self.w_bits, self.group_size)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ (N, K) in the transformed (smoothed, rotated) input basis."""
        return grids.dequantize_weight(self.weight_params(), dtype)

    def _decoded_weight(self, kind: str) -> torch.Tensor:
        """Read-only fp32 decodings for the forward, cached until the weight buffers change
        (:mod:`.weight_cache`): ``"w_hat"`` = Ŵ (N, K), ``"w_int"`` = q − z (N, K), one group per row."""
        if kind == "w_hat":
            build = lambda: self.dequantized_weight(torch.float32)   # noqa: E731
        else:
            build = lambda: self.weight_params().codes.float() - self.w_zero   # noqa: E731
        return self._decoded_cache().get(kind, (self.qweight, self.w_scale, self.w_zero), build)

    def _decoded_cache(self) -> DecodedWeights:
        if "_decoded" not in self.__dict__:                            # modules unpickled from older versions
            self._decoded = DecodedWeights()
        return self._decoded

    @property
    def execution(self) -> ExecutionConfig:
        """How this layer runs: its model's execution config (``RuntimeState.execution``, set by
        ``dvdquant.set_backend``); the simulated reference for a layer without a state."""
        return _SIMULATED if self.state is None else self.state.execution

    # ---------------------------------------------------------------- activation side
    def current_a_bits(self) -> int:
        """This call's activation bits: the RuntimeState override (δ-GBS), except for weight-only layers
        (:func:`~dvdquant.numerics.grids.call_bits`).

        A weight-only layer does not read the state at all, so a compiled model installs no guard on it.
        """
        if self.state is None or grids.is_weight_only(self.a_bits):
            return self.a_bits
        return grids.call_bits(self.a_bits, self.state.a_bits)

    def _all_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample maxima over tokens (G, K), extended to every rank's tokens of each sample under
        context parallelism (RuntimeState)."""
        return t if self.state is None else self.state.all_tokens_max(t)

    def _step(self) -> int:
        return 0 if self.state is None or self.state.step_index is None else self.state.step_index

    def transform_input(self, x2: torch.Tensor, reuse: bool = False) -> torch.Tensor:
        """Static smoothing and online rotation of fp32 tokens (M, K). ``reuse``: a rotated result may live in
        this thread's scratch buffer (:mod:`~dvdquant.numerics.scratch`), for a caller done with it before the
        next such call."""
        if self.smooth is not None:
            x2 = x2 / self.smooth[min(self._step(), self.smooth.shape[0] - 1)]
        if self.rotation_block:
            out = scratch(x2.numel(), torch.float32, x2.device, "quant_linear.input") if reuse else None
            x2 = hadamard_rotate_exact(x2, self.rotation_block, out)     # x·H: snapped, exact ±1 sums, · 1/√R
        return x2

    def per_token_scaling(self, bits: int) -> bool:
        """Whether this call's product has one activation scale per token and one weight step per
        output channel (no Λ, no groups): then it runs in the exact code-GEMM order (with dynamic
        smoothing too: one code GEMM per sample against its re-quantized weight)."""
        if grids.is_weight_only(bits) or self.act_balance is not None or self.w_scale.shape[1] != 1:
            return False
        k = self.in_features
        return self.auto_scale == "none" or (self.auto_scale == "per_block"
                                             and (k % self.scale_block != 0 or self.scale_block == k))

    def _quantize_tokens(self, x2: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        if bits == 8 and self.a8_format == "fp8_e4m3":
            return grids.quantize_act_per_token_fp8_e4m3(x2)
        return grids.quantize_act_per_token_int(x2, bits)

    def _fake_quant_tokens(self, x2: torch.Tensor, bits: int, amax: Optional[torch.Tensor] = None,
                           lam: Optional[torch.Tensor] = None, overwrite: bool = False) -> torch.Tensor:
        """``codes.float() * scale`` of :meth:`_quantize_tokens` per row (of ``x2 / lam``, times ``lam``), fp32:
        fresh, or ``x2`` itself with ``overwrite``."""
        fmt = "fp8" if bits == 8 and self.a8_format == "fp8_e4m3" else "int"
        return grids.fake_quant_act_rows(x2, bits, fmt, amax, lam, overwrite)

    def _require_finite(self, x2: torch.Tensor, amax: Optional[torch.Tensor] = None) -> None:
        """Raise unless ``x2`` is finite; ``amax``: max |x2| over any partition of it (rows, columns), if known."""
        if not torch.isfinite((absmax(x2, tuple(range(x2.ndim))) if amax is None else amax).amax()):
            raise NonFiniteError(f"layer {self.layer_name or '?'}: input activations hold NaN/Inf")

    def quantize_input(self, x2: torch.Tensor, bits: int, samples: int = 1, overwrite: bool = False) -> torch.Tensor:
        """ARQ auto-scaling + per-token fake quantization of transformed tokens (M, K), fp32 out.

        ``samples``: the G batch elements the M tokens belong to (G contiguous groups); ``per_channel``
        takes one Λ_t per sample (:mod:`~dvdquant.numerics.samples`). ``overwrite``: ``x2`` is the
        caller's scratch (fp32 contiguous): the result is computed in its storage.
        """
        if grids.is_weight_only(bits):
            return x2
        if self.act_balance is not None:                              # calibrated Λ for this step
            self._require_finite(x2)
            lam = self.act_balance[min(self._step(), self.act_balance.shape[0] - 1)].unsqueeze(0)
            return self._fake_quant_tokens(x2, bits, lam=lam, overwrite=overwrite)
        if self.auto_scale == "per_channel":
            amax = per_sample_absmax(x2, samples)                    # (G, K): this rank's tokens
            self._require_finite(x2, amax)
            lam = self._all_tokens(amax)                              # Λ_t per sample, over all ranks' tokens
            lam = torch.where(lam > 0, lam, torch.ones_like(lam))
            xs = x2.reshape(samples, -1, x2.shape[1])                 # (G, L, K): each sample's own Λ_t
            return self._fake_quant_tokens(xs, bits, lam=lam.unsqueeze(1), overwrite=overwrite).reshape(x2.shape)
        m, k = x2.shape
        b = self.scale_block if self.auto_scale == "per_block" and k % self.scale_block == 0 else k
        xb = x2.reshape(m * (k // b), b)                              # one scale per (token, block)
        amax = absmax(xb, -1, keepdim=True)
        self._require_finite(x2, amax)
        return self._fake_quant_tokens(xb, bits, amax, overwrite=overwrite).reshape(m, k)

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.execution.backend != "simulated":
            return kernel_forward(self, x)                  # nn → kernels, one way (.execution)
        return self.forward_simulated(x)

    def forward_simulated(self, x: torch.Tensor) -> torch.Tensor:
        """The reference: fp32 fake quantization of exactly the integer pipeline."""
        if self.w_block_sum is not None:
            return self.with_exact_mean(x, self._forward_simulated)
        return self._forward_simulated(x)

    def with_exact_mean(self, x: torch.Tensor, core) -> torch.Tensor:
        """y = core(x_c) + x̄·w_block_sumᵀ (mean_channel="exact"); ``core`` maps fp32 (..., K) → fp32 (..., N).

        x̄ (M, K/R) is each token's mean over each rotation block and x_c = x − x̄ per block, in fp32;
        the mean and the mean term are computed one sample at a time (their rounding then cannot
        depend on the batch), the sum in fp32, then cast to ``x.dtype``.
        """
        if self.dyn_alpha is not None or self.smooth is not None:
            raise DVDQuantError(f"layer {self.layer_name or '?'}: the exact block-mean term cannot be combined "
                                "with smoothing")
        shape, r = x.shape, self.rotation_block
        samples = sample_count(shape)
        xb = x.reshape(-1, self.in_features // r, r).float()         # (M, K/R, R)
        xbar = torch.cat([g.mean(dim=-1) for g in rows_per_sample(xb, samples)])   # (M, K/R)
        xc = (xb - xbar.unsqueeze(-1)).reshape(shape)
        y = core(xc).reshape(-1, self.out_features)
        y = y + matmul_per_sample(xbar, self.w_block_sum, samples)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _forward_simulated(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()                  # (M, K)
        samples = sample_count(shape)                                 # statistics per batch element
        bits = self.current_a_bits()
        if self.dyn_alpha is not None and not grids.is_weight_only(bits):
            s = self.dynamic_smoothing(x2, samples)                   # (G, K), from each sample's tokens
            xt = self.transform_input(scale_per_sample(x2, s, True))
            if self.per_token_scaling(bits):
                y = self._forward_dynamic_per_token(xt, s, bits, samples)
            else:
                xq = self.quantize_input(xt, bits, samples, overwrite=True)
                # one Q(W·diag(s_g)·H) per sample: s_t is per sample, so is the re-quantized weight
                ys = [xg @ w.t() for xg, w in zip(rows_per_sample(xq, samples), self.smoothed_weights(s))]
                y = torch.cat(ys) if self.bias is None else torch.cat(ys) + self.bias.float()
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        if self.dyn_alpha is None and self.per_token_scaling(bits):
            return self._forward_per_token(self.transform_input(x2), bits).to(x.dtype).reshape(
                *shape[:-1], self.out_features)
        w = self._decoded_weight("w_hat")                             # dynamic smoothing: its weight at s = 1
        xt = self.transform_input(x2, reuse=True)                    # read only by the GEMMs below
        xq = self.quantize_input(xt, bits, samples, overwrite=xt is not x2)   # a transformed copy is scratch
        y = matmul_per_sample(xq, w, samples)                         # (M, N), one GEMM per sample
        if self.bias is not None:
            y += self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _forward_per_token(self, xt: torch.Tensor, bits: int) -> torch.Tensor:
        """y (M, N) fp32 = ((Σ c·W_int) · Δ) · s + b from transformed tokens ``xt`` (M, K)."""
        self._require_finite(xt)
        codes, s = self._quantize_tokens(xt, bits)                    # (M, K), (M, 1)
        w_int = self._decoded_weight("w_int")                         # (N, K) integers q − z
        fp8 = codes.dtype == torch.float8_e4m3fn
        pmax = None if fp8 else grids.act_qmax(bits) * grids.weight_int_max(self.w_bits)
        return linear_per_token_per_channel(codes, s, w_int, self.w_scale, self.bias, pmax)

    def _forward_dynamic_per_token(self, xt: torch.Tensor, s: torch.Tensor, bits: int, samples: int) -> torch.Tensor:
        """Dynamic smoothing with per-token scales: y (M, N) fp32, per sample g ((Σ c·W_int,g) · Δ_g) · s + b
        with W_int,g = q_g − z_g of the sample's re-quantized weight (the FP8 GEMM's epilogue order)."""
        self._require_finite(xt)
        codes, scale = self._quantize_tokens(xt, bits)                # (M, K), (M, 1)
        pmax = None if codes.dtype == torch.float8_e4m3fn else grids.act_qmax(bits) * grids.weight_int_max(self.w_bits)
        ys = [linear_per_token_per_channel(cg, sg, p.codes.float() - p.zero, p.scale, self.bias, pmax)
              for cg, sg, p in zip(rows_per_sample(codes, samples), rows_per_sample(scale, samples),
                                   self.smoothed_weight_param_list(s))]
        return torch.cat(ys)

    def extra_repr(self) -> str:
        rot = f"hadamard{self.rotation_block}" if self.rotation_block else "none"
        return (f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}, group={self.group_size}, "
                f"a_bits={self.a_bits}, rotation={rot}, auto_scale={self.auto_scale}, "
                f"smooth={'none' if self.smooth is None else self.smooth.shape[0]}"
                + (f", dynamic_smoothing(alpha={self.dyn_alpha})" if self.dyn_alpha is not None else "")
                + (", mean_channel=exact" if self.w_block_sum is not None else ""))
