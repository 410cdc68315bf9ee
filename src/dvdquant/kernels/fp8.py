"""The Hopper (sm89/sm90) path: FP8 e4m3 tensor-core GEMM with int4-grid operands.

Math
----
With activation codes c (M, K) and scales s, weight integers W_int = q − z (N, K) and steps
Δ (N,), the quantized linear is ::

    y[m, n] = Σ_g s[m, g] · Δ[n] · Σ_{k ∈ block g} c[m, k] · W_int[n, k]  + b[n]

* per-token scales (G = 1): a plain row-wise-scaled FP8 GEMM, ``scale_a = s`` (M, 1),
  ``scale_b = Δ`` (1, N). A4 codes (|c| ≤ 7) and W_int (|w| ≤ 15) are exact in e4m3 and
  their products sum exactly in the tensor cores' fp32 accumulator (|sum| ≤ 105·K < 2^24 for
  K ≤ 159k) with ``use_fast_accum=False``, so A4 is the integer GEMM, exactly, up to the
  final scaling and the bf16 output rounding. ``fast_accum=True`` (opt-in, the model's
  ``ExecutionConfig``, set by ``dvdquant.set_backend(..., fast_accum=True)``) lets cuBLAS
  keep the sums in the tensor cores' reduced-precision accumulator: faster, exact while the
  running sums stay small, but low bits are dropped once they grow (docs/KERNELS.md). Rotated
  activations are zero-mean, which is why it can be worth it. The per-block GEMM keeps exact accumulation.
* per-(token, 128-channel) scales (ARQ ``per_block``, G = K/128): ``_scaled_mm``'s blockwise
  1×128 scaling: scale_a (M, K/128), scale_b (K/128, N) holding Δ[n] in every k-block (exact: Δ
  is constant along K).
* Int-grid steps with per-token scales take int8 codes and the exact INT8 GEMM by default
  (:func:`gemm_int8_rowwise`; A6/A8 everywhere, A4 on sm90: :func:`act_format_for`). Otherwise
  A6 / A8 steps use FP8 e4m3 activations (``s = amax/448``), as the method's A8 "fp8_e4m3"
  format does: integer codes above 16 are not all representable in e4m3. For a layer configured
  with ``a8_format="int"`` that is a different (finer near zero, coarser at the top) 8-bit grid
  than the simulated path: logged once per layer.

``_scaled_mm`` layout rules (torch 2.11)
-------------------------------------------------------------------------------
* ``mat1`` row-major (M, K), ``mat2`` column-major (K, N): pass the contiguous (N, K)
  weight as ``w.t()``.
* K and N multiples of 16; fp32 scales; row-wise: (M, 1) and (1, N), contiguous.
* Blockwise 1×128 activation scales must be "outer-dim major": an (M, K/128) *view* of a
  contiguous (K/128, M) buffer (the Triton kernel writes them that way directly).
* ``bias`` must have the output dtype; out dtype bf16 (or fp16).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import NonFiniteError
from ..numerics.grids import call_bits, is_weight_only
from ..numerics.hadamard import cached_hadamard, hadamard_rotate, hadamard_rotate_exact
from .env import log_once
from .expand import ExpansionPool
from .finite import device_flag, finite_check_mode, layer_id, layer_key, layer_name_of
from .int8_gemm import gemm_output
from .triton_act_quant import act_quant, fusable_rotation

log = logging.getLogger(__name__)

_POOL = ExpansionPool()


# ---------------------------------------------------------------------------------- weights
def release_weight_buffers() -> None:
    """Free the expansion pool."""
    _POOL.clear()


# ---------------------------------------------------------------------------------- GEMMs
def gemm_rowwise(q: torch.Tensor, s: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                 bias: Optional[torch.Tensor], out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """q (M, K) fp8, s (M, 1) fp32, w8 (N, K) fp8, w_scale (N, 1) fp32 → (M, N) out_dtype.

    ``fast_accum``: cuBLAS' fast FP8 accumulation (Hopper's tensor-core accumulator, ~14
    significant bits, no periodic promotion to fp32): faster, no longer the exact integer GEMM
    (see the module doc and :func:`dvdquant.set_backend`)."""
    n = w8.shape[0]
    return torch._scaled_mm(q, w8.t(),                                  # (M, K) @ (K, N) col-major
                            scale_a=s, scale_b=w_scale.reshape(1, n),  # (M, 1), (1, N)
                            bias=bias, out_dtype=out_dtype, use_fast_accum=fast_accum)


BLOCKWISE_M = 128   # rows of the blockwise GEMM are padded to a multiple of this (see gemm_blockwise)


def gemm_blockwise(q, s_kmajor, w8, w_scale, bias, out_dtype):
    """Per-(token, 128-channel) scaled GEMM: q (M, K) fp8, s_kmajor (M, K/128) a view of a contiguous
    (K/128, M) buffer, w8 (N, K) fp8, w_scale (N, 1) → (M, N) out_dtype, exact accumulation.

    cuBLASLt rejects some M for 1×128 scaling (CUBLAS_STATUS_NOT_SUPPORTED at M = 1000 on an H100,
    torch 2.11): M is padded to a multiple of :data:`BLOCKWISE_M` with zero codes (scale 1) and the
    padding rows are dropped; every output row depends on its own row only."""
    m, k, n = q.shape[0], q.shape[1], w8.shape[0]
    mp = -(-m // BLOCKWISE_M) * BLOCKWISE_M
    if mp != m:
        qp = torch.zeros(mp, k, dtype=torch.uint8, device=q.device).view(q.dtype)
        qp[:m] = q
        sp = torch.ones(k // 128, mp, dtype=s_kmajor.dtype, device=q.device)
        sp[:, :m] = s_kmajor.t()
        q, s_kmajor = qp, sp.t()
    sb = w_scale.reshape(1, n).expand(k // 128, n).contiguous()         # (K/128, N): Δ per k-block
    y = torch._scaled_mm(q, w8.t(), scale_a=s_kmajor, scale_b=sb, out_dtype=out_dtype,
                         use_fast_accum=False)[:m]
    return y if bias is None else y + bias


# ---------------------------------------------------------------------------------- forward
def resolve_bits(bits: torch.Tensor, default_bits: int) -> int:
    """The step's activation bits: the shared override in ``bits`` (CPU int32, −1 = none) or the layer's.

    A weight-only layer keeps its A16 whatever the override says (:func:`~dvdquant.numerics.grids.call_bits`:
    δ-GBS switches activation quantizers, and it has none).
    """
    return call_bits(default_bits, int(bits.reshape(-1)[0]) if bits.numel() else -1)


def int8_tensor_cores_for_a4(device: torch.device) -> bool:
    """Whether A4 (≤ 5-bit) int-grid steps take the INT8 GEMM on ``device`` (with ``int8_gemm=True``).

    Faster than cuBLAS' exact FP8 GEMM only on sm90 (the persistent TMA kernel; docs/KERNELS.md). On
    sm89 A4 stays on cuBLAS FP8. On CPU both are exact and ``_int_mm`` is the cheaper emulation."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (9, 0)


def act_format_for(bits: int, a8_fp8: bool, layer_name: str, per_block: bool = False,
                   int8_gemm: bool = True, fast_accum: bool = False, a4_int8: bool = True) -> str:
    """How this step's activations are coded and multiplied.

    * ``"int8"`` (``int8_gemm``, the default; per-token scales): int-grid codes as int8 → INT8
      tensor-core GEMM with the epilogue fused (:func:`gemm_int8_rowwise`): the simulated path's own
      grid, bit for bit. All 6–8-bit int-grid steps; ≤ 5-bit steps too where ``a4_int8``
      (:func:`int8_tensor_cores_for_a4`) and not ``fast_accum`` (which asks for cuBLAS' FP8 GEMM);
    * ``"int"``: int-grid codes of ≤ 5 bits, exact in e4m3 → cuBLAS FP8 GEMM (exact unless
      ``fast_accum``);
    * ``"fp8"``: FP8 e4m3 values (``s = amax/448``) → FP8 GEMM: the A8 ``"fp8_e4m3"`` format; also
      6–8-bit int grids with per-block scales or with ``int8_gemm=False`` (a different 8-bit grid
      than the simulated path's; logged once per layer).
    """
    if bits <= 5:
        return "int8" if int8_gemm and a4_int8 and not per_block and not fast_accum else "int"
    if a8_fp8 and bits == 8:
        return "fp8"
    if int8_gemm and not per_block:
        return "int8"
    log_once(log, ("e4m3", layer_name, bits), "layer %s: A%d int-grid codes are not exact in e4m3: using FP8 "
             "e4m3 activations (s = amax/448)", layer_name or "?", bits)
    return "fp8"


def gemm_int8_rowwise(q: torch.Tensor, s: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                      bias: Optional[torch.Tensor], out_dtype: torch.dtype, chunk_elems: int = 1 << 26,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q (M, K) int8 codes, s (M, 1), w8 (N, K) int8 (q − z), w_scale (N, 1) → (M, N) out_dtype (into ``out``
    if given: :func:`.int8_gemm.gemm_output`).

    On CUDA: the Triton INT8 GEMM with the epilogue fused (:mod:`.int8_gemm`; the persistent TMA kernel
    on sm90, :func:`.int8_gemm.launch_config`). Elsewhere (CPU, or a K no tile divides): ``torch._int_mm`` (int32 accumulation: the exact integer GEMM), then the
    emulated path's epilogue ((acc · Δ) · s) + b in fp32. Both give the emulated outputs bit for bit
    (the int32 → fp32 conversion rounds like the emulated path's exact sum does). ``_int_mm`` rows go
    in chunks of ≤ ``chunk_elems`` outputs so the int32/fp32 temporaries stay small; it needs more
    than 16 rows on CUDA, so a short tail is folded into the chunk before it.
    """
    if q.is_cuda:
        from .int8_gemm import int8_gemm, launch_config
        cfg = launch_config(q, w8)
        if cfg is not None:
            return int8_gemm(q, s, w8, w_scale, bias, out_dtype, config=cfg, out=out)
    m, n = q.shape[0], w8.shape[0]
    out = gemm_output(m, n, out_dtype, q.device, out)
    delta = w_scale.reshape(1, n).float()
    b = None if bias is None else bias.float()
    step = max(32, chunk_elems // max(n, 1) // 16 * 16)
    r0 = 0
    while r0 < m:
        r1 = m if m - (r0 + step) <= 16 else r0 + step
        qa = q[r0:r1]
        if qa.shape[0] > 16:
            acc = torch._int_mm(qa, w8.t()).float()                                   # (rows, N) exact
        else:                                                                         # ≤ 16 rows in all
            acc = (qa.double() @ w8.double().t()).float()
        y = (acc * delta) * s[r0:r1]
        out[r0:r1] = y if b is None else y + b
        r0 = r1
    return out


def quantize_tokens(x2: torch.Tensor, bits: int, fmt: str, smooth: Optional[torch.Tensor],
                    rotation_block: int, scale_block: Optional[int], nonfinite_flag: Optional[torch.Tensor] = None,
                    flag_id: int = 0, exact_rotation: bool = True,
                    codes_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Transform + quantize tokens (M, K) with the fused kernel; rotations it can't fuse go first.

    Returns codes (M, K) fp8 and scales (M, G) fp32 — for per-block scales a transposed view of a
    contiguous (G, M) buffer, the layout blockwise ``_scaled_mm`` wants. ``nonfinite_flag`` /
    ``flag_id``: NaN/Inf recording on the device (:mod:`.finite`). ``exact_rotation=False``
    (opt-in): skip the snap of the exact rotation — ~25 % cheaper activation kernel, codes then
    within one step of the reference's on a few elements (:func:`dvdquant.set_backend`).
    """
    r = rotation_block or None
    h = None
    if r and not fusable_rotation(x2.shape[1], r, scale_block):
        log_once(log, ("torch-rotation", x2.shape[1], r), "rotation of order %d (K = %d) has no fused kernel (it "
                 "fuses powers of two 16-128): it runs in torch before the kernel and costs more than the "
                 "layer's GEMM; quantize with rotation_block=128 for the fused path", r, x2.shape[1])
        xf = x2.float()                            # large / odd rotation (and smooth): torch first
        if smooth is not None:
            xf = xf / smooth
        x2 = hadamard_rotate_exact(xf, r) if exact_rotation else hadamard_rotate(xf, r)
        smooth = None
    elif r:
        h = cached_hadamard(r, x2.device)
    return act_quant(x2, bits=bits, fmt=fmt, smooth=smooth, h_block=h, block=scale_block,
                     scales_k_major=scale_block is not None, nonfinite_flag=nonfinite_flag, flag_id=flag_id,
                     config=None if exact_rotation else {"snap": False}, codes_dtype=codes_dtype)


@dataclass(frozen=True)
class FP8Options:
    """The static part of one FP8-path call (layer configuration and execution options), passed to the
    custom op as one ``options`` list of ints (:meth:`encode`).

    ``a_bits``: the layer's configured bits (a weight-only layer keeps A16 whatever the step says);
    ``rotation_block`` 0: no online rotation; ``per_block``: per-(token, ``scale_block``) scales;
    ``a8_fp8``: the layer's A8 format is FP8 e4m3; the rest: :class:`~dvdquant.kernels.ExecutionConfig`.
    """

    a_bits: int
    rotation_block: int
    scale_block: int
    per_block: bool = False
    a8_fp8: bool = False
    fast_accum: bool = False
    exact_rotation: bool = True
    int8_gemm: bool = True

    def encode(self) -> list[int]:
        return [int(self.a_bits), int(self.rotation_block), int(self.scale_block), int(self.per_block),
                int(self.a8_fp8), int(self.fast_accum), int(self.exact_rotation), int(self.int8_gemm)]

    @classmethod
    def decode(cls, v) -> "FP8Options":
        return cls(int(v[0]), int(v[1]), int(v[2]), bool(v[3]), bool(v[4]), bool(v[5]), bool(v[6]), bool(v[7]))


@torch.library.custom_op("dvdquant::w4_linear_fp8", mutates_args=())
def w4_linear_fp8(x2: torch.Tensor, qweights: list[torch.Tensor], w_zeros: list[torch.Tensor], w_scale: torch.Tensor,
                  bias: Optional[torch.Tensor], smooth: Optional[torch.Tensor], bits: torch.Tensor,
                  options: list[int], layer: torch.Tensor) -> torch.Tensor:
    """W4 linear(s) on the FP8 path: x2 (M, K) bf16/fp16/fp32 → (M, ΣN) bf16/fp16.

    ``qweights`` / ``w_zeros``: one packed weight, or several sibling ones that read the same tokens
    (fused Q/K/V: the tokens are rotated and quantized once, the weights expand one below the other
    into one pooled (ΣN, K) buffer and one GEMM writes the concatenated outputs; ``w_scale`` (ΣN, 1)
    and ``bias`` (ΣN,) are the members' concatenated; per-token scales, no ``smooth``). Each output
    column is computed as the member's own call computes it, bit for bit. ``options``:
    :meth:`FP8Options.encode`; ``layer``: the layer's :func:`.finite.layer_key` (its name in log lines and
    non-finite reports; a tensor, so compiled frames of same-form layers are shared).

    A custom op so that ``torch.compile`` traces a quantized model without graph breaks: the op
    is opaque to dynamo/inductor (they fuse the glue *around* it), and the step's bit-width is
    read from the CPU tensor ``bits`` inside it, so δ-GBS switching never triggers a recompile.
    The weight expansion into the shared per-shape buffer happens inside too, so no compiled
    graph ever holds a pooled buffer across two layers.
    """
    if len(qweights) == 1:
        expand = lambda dtype: _POOL.expand(qweights[0], w_zeros[0], dtype)     # noqa: E731
    else:
        expand = lambda dtype: _POOL.expand_many(qweights, w_zeros, dtype)      # noqa: E731
    return _w4_linear(x2, expand, w_scale, bias, smooth, bits, FP8Options.decode(options), layer_name_of(layer))


def w4_linear_packed(x2: torch.Tensor, qweight: torch.Tensor, w_zero: torch.Tensor, w_scale: torch.Tensor,
                     bias: Optional[torch.Tensor], bits: torch.Tensor, o: FP8Options, layer_name: str) -> torch.Tensor:
    """The body of :func:`w4_linear_fp8` for one packed weight and no smoothing, for other ops to call."""
    return _w4_linear(x2, lambda dtype: _POOL.expand(qweight, w_zero, dtype), w_scale, bias, None, bits, o,
                      layer_name)


def gemm_out_dtype(x2: torch.Tensor) -> torch.dtype:
    """The FP8 ops' output dtype for tokens ``x2``: bf16 / fp16 as given, bf16 for fp32."""
    return x2.dtype if x2.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _w4_linear(x2, expand, w_scale, bias, smooth, bits, o: FP8Options, layer_name: str) -> torch.Tensor:
    """The body of the op; ``expand(dtype)`` returns the (N, K) weight integers q − z in ``dtype``."""
    b = resolve_bits(bits, o.a_bits)
    w_scale = w_scale.float()                     # (N, 1) fp32 Δ, also if the model was cast with .to()
    out_dtype = gemm_out_dtype(x2)
    bias_o = None if bias is None else bias.to(out_dtype)
    fmt = "none" if is_weight_only(b) else act_format_for(b, o.a8_fp8, layer_name, o.per_block, o.int8_gemm,
                                                           o.fast_accum, int8_tensor_cores_for_a4(x2.device))
    w8 = expand(torch.int8 if fmt == "int8" else torch.float8_e4m3fn)       # (N, K) q − z
    n = w8.shape[0]
    if is_weight_only(b):                # no activation quantization: bf16 GEMM on the dequantized weight
        xf = x2.float() if smooth is None else x2.float() / smooth
        if o.rotation_block:
            xf = hadamard_rotate_exact(xf, o.rotation_block)
        w = (w8.float() * w_scale.reshape(n, 1)).to(out_dtype)
        return torch.nn.functional.linear(xf.to(out_dtype), w, bias_o)
    blk = o.scale_block if o.per_block else None
    mode = finite_check_mode()             # "step": recorded on the device, read once per step
    flag = device_flag(x2.device) if mode == "step" else None
    q, s = quantize_tokens(x2, b, "int" if fmt == "int8" else fmt, smooth, o.rotation_block, blk, flag,
                           layer_id(layer_name) if flag is not None else 0, o.exact_rotation,
                           torch.int8 if fmt == "int8" else torch.float8_e4m3fn)       # (M, K), (M, G)
    if mode == "layer" and not bool(torch.isfinite(s).all()):   # one sync per layer
        raise NonFiniteError(f"layer {layer_name or '?'}: input activations hold NaN/Inf")
    if fmt == "int8":
        return gemm_int8_rowwise(q, s, w8, w_scale, bias_o, out_dtype)
    if o.per_block:
        return gemm_blockwise(q, s, w8, w_scale, bias_o, out_dtype)
    return gemm_rowwise(q, s, w8, w_scale, bias_o, out_dtype, o.fast_accum)


@w4_linear_fp8.register_fake
def _w4_linear_fp8_fake(x2, qweights, w_zeros, w_scale, bias, smooth, bits, options, layer):
    out_dtype = gemm_out_dtype(x2)
    return x2.new_empty((x2.shape[0], sum(q.shape[0] for q in qweights)), dtype=out_dtype)


def w4_linear(x: torch.Tensor, qweights: list, w_zeros: list, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
              smooth: Optional[torch.Tensor], bits: torch.Tensor, options: FP8Options,
              layer: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x̂ Ŵᵀ + b of x (..., K) through :func:`w4_linear_fp8`; output in x's dtype (bf16 GEMM output
    for fp32 x). ``bits``: the step's bits, a CPU int32 tensor (−1: the layer's ``options.a_bits``);
    ``layer``: its :func:`.finite.layer_key` (None: unnamed)."""
    shape = x.shape
    y = w4_linear_fp8(x.reshape(-1, shape[-1]), list(qweights), list(w_zeros), w_scale, bias, smooth, bits,
                      options.encode(), layer_key("") if layer is None else layer)
    return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])
