"""int4 GEMV: weight-only (W4A16) linears at small M, reading the packed int4 weight directly.

Why: AdaLN modulation layers (HunyuanVideo 3072 → 18432, Wan 5120 → 30720, …) are quantized
weight-only and see one activation row per sample (M = 1–4). Expanding the whole weight to
fp32 and calling ``F.linear`` costs ~1 ms per layer; the work is a matrix-vector product whose
floor is reading the packed weight once (N·K/2 bytes: 28 MB → ~10 µs at H100 bandwidth).
This kernel computes, for activations x (M, K) and the BGR weight layout of ``expand.py``,

    y[m, n] = Δ[n] · Σ_k x[m, k] · (q[n, k] − z[n])  (+ b[n])

with fp32 products and fp32 accumulation, cast once to the output dtype. (q − z) is formed
per element, exactly (an integer in [−15, 15]); the alternative Σ x·q − z·Σ x would cancel
badly for activations with a large mean (SiLU outputs are mostly positive). The summation
order differs from ``x.float() @ Ŵᵀ`` (the emulated path and :func:`int4_linear_reference`),
so results agree to fp32 rounding (≈1e-6 relative), not bitwise. The result is deterministic:
one program owns each output element and loops over all of K (no split-K atomics).

Nibble → float without ``cvt``: OR-ing a code q ∈ [0, 15] into the low mantissa bits of the
fp32 bit pattern of 2²³ gives the float 2²³ + q exactly, so ``bits(2²³ | q) − (2²³ + z)`` is
q − z in one subtraction. Int → float conversion runs at 1/8 of the FMA rate on Hopper and
would otherwise bound the kernel below HBM bandwidth. Exact for integer zero points (all that
BGR stores); a fractional z would be rounded to an integer by the 2²³ + z sum.

Tiling: one program per BLOCK_N weight rows, a loop over K in steps of BLOCK_K codes. A step
loads a contiguous (BLOCK_N, BLOCK_K/2) byte tile, splits it into low/high nibbles and
re-interleaves them (``tl.join`` + reshape) into a (BLOCK_N, BLOCK_K) tile in k order, so x is
read with contiguous loads too; all M ≤ BLOCK_M rows of x share the weight tile by
broadcasting and each step's (M, N, K) products are summed over K into an fp32 (M, N)
accumulator. ``tl.dot`` is avoided: M is far below a tensor-core tile, and bf16 ``tl.dot`` is
broken in Triton 3.9's CPU interpreter. The final cast is round-to-nearest-even on the GPU
(the CPU interpreter truncates fp32 → bf16 instead: tests allow one bf16 ulp).

Layouts (as ``numerics/packing.py`` and ``expand.py``):
* ``packed`` uint8 (N, K/2), unit stride along K: byte j of row n holds q[n, 2j] in its low
  nibble and q[n, 2j + 1] in its high nibble;
* ``zero`` (N, 1) fp32 integers z, ``w_scale`` (N, 1) fp32 Δ, ``bias`` (N,) or None;
* ``x2`` (M, K) bf16 / fp16 / fp32 with unit stride along K (any row stride), M ≤ MAX_M;
* output (M, N) contiguous, bf16 / fp16 / fp32.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import triton
import triton.language as tl

from ..errors import ConfigError

log = logging.getLogger(__name__)

MAX_M = 16                     # rows of x per call; larger M is a GEMM, not a GEMV
X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LOGGED_CONFIGS: set = set()


@triton.jit
def int4_gemv_kernel(x_ptr, p_ptr, z_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                     stride_xm, stride_pn, stride_ym,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N),): y[m, n] = Δ[n]·Σ_k x[m, k]·(q[n, k] − z[n]) (+ b[n]), fp32.

    Each step of the K loop reads BLOCK_K/2 packed bytes (BLOCK_K codes) of BLOCK_N weight rows
    (contiguous: 128-bit loads) and the matching BLOCK_K columns of all M ≤ BLOCK_M activation
    rows; the rows of x are handled by broadcasting, so the weight is read exactly once.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)                 # (BLOCK_N,) weight rows n
    ms = tl.arange(0, BLOCK_M)                                   # (BLOCK_M,) activation rows m
    row_ok = rows < N
    m_ok = ms < M
    z = tl.load(z_ptr + rows, mask=row_ok, other=0.0)
    magic_z = (z + 8388608.0)[:, None]                           # (BLOCK_N, 1): 2²³ + z, exact for integer z
    p_rows = p_ptr + rows.to(tl.int64)[:, None] * stride_pn      # (BLOCK_N, 1) row starts of the packed weight
    x_rows = x_ptr + ms.to(tl.int64)[:, None] * stride_xm        # (BLOCK_M, 1) row starts of x
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        jb = k0 // 2 + tl.arange(0, BLOCK_K // 2)                # packed byte j holds codes k = 2j, 2j + 1
        byte = tl.load(p_rows + jb[None, :], mask=row_ok[:, None] & (jb[None, :] < K // 2), other=0)
        byte = byte.to(tl.int32)                                 # (BLOCK_N, BLOCK_K/2), zero-extended
        w_even = ((byte & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - magic_z         # q[n, 2j] − z[n]
        w_odd = (((byte >> 4) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - magic_z  # q[n, 2j+1] − z[n]
        w = tl.reshape(tl.join(w_even, w_odd), (BLOCK_N, BLOCK_K))  # (BLOCK_N, BLOCK_K): column i ↔ k0 + i
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + ks[None, :], mask=m_ok[:, None] & (ks[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)   # (BLOCK_M, BLOCK_N): Σ x·(q − z)
    scale = tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    y = acc * scale[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = m_ok[:, None] & row_ok[None, :]
    tl.store(y_ptr + ms[:, None] * stride_ym + rows[None, :], y.to(y_ptr.dtype.element_ty), mask=out_mask)


def default_config(m: int) -> dict:
    """Launch config for M rows (``benchmarks/bench_int4_gemv.py`` sweeps alternatives): 16 weight rows
    per program, one pipeline stage, and a K step that keeps the (M, N, K) fp32 product tile at 128
    values per thread — M ≤ 2: 512 codes with 2·M warps; M ≤ 4: 256 codes, 4 warps; … M = 16: 64 codes."""
    block_m = triton.next_power_of_2(max(m, 1))
    if block_m <= 2:
        return {"block_n": 16, "block_k": 512, "num_warps": 2 * block_m, "num_stages": 1}
    return {"block_n": 16, "block_k": max(16, 1024 // block_m), "num_warps": 4, "num_stages": 1}


def _check_pow2(name: str, v: int, lo: int) -> None:
    if v < lo or v & (v - 1):
        raise ConfigError(f"{name} must be a power of two ≥ {lo}, got {v}")


def _validate(x2: torch.Tensor, packed: torch.Tensor, zero: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor], out_dtype: Optional[torch.dtype], check_m: bool = True) -> torch.dtype:
    """Shape/dtype checks shared by the kernel and the reference; returns the output dtype."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ConfigError(f"packed int4 weights must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    n, k = packed.shape[0], packed.shape[1] * 2
    if x2.dim() != 2 or x2.dtype not in X_DTYPES:
        raise ConfigError(f"int4 GEMV input must be 2-D bf16/fp16/fp32, got {x2.dtype} {tuple(x2.shape)}")
    if x2.shape[1] != k:
        raise ConfigError(f"int4 GEMV: x has K={x2.shape[1]} but the packed weight has K={k} (2 × {packed.shape[1]})")
    if check_m and x2.shape[0] > MAX_M:
        raise ConfigError(f"int4 GEMV handles M ≤ {MAX_M} rows, got M={x2.shape[0]}; use a GEMM path")
    for name, t in (("zero", zero), ("w_scale", w_scale)) + ((("bias", bias),) if bias is not None else ()):
        if t.numel() != n:
            raise ConfigError(f"int4 GEMV needs one {name} per output row (N={n}), got {tuple(t.shape)}")
    out_dtype = out_dtype or (x2.dtype if x2.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16)
    if out_dtype not in X_DTYPES:
        raise ConfigError(f"int4 GEMV output dtype must be bf16/fp16/fp32, got {out_dtype}")
    return out_dtype


def int4_linear_small_m(x2: torch.Tensor, packed: torch.Tensor, zero: torch.Tensor, w_scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                        block_n: Optional[int] = None, block_k: Optional[int] = None,
                        num_warps: Optional[int] = None, num_stages: Optional[int] = None) -> torch.Tensor:
    """y (M, N) = x2 · Ŵᵀ (+ bias) with Ŵ = Δ ⊙ (q − z) read from packed int4, for M ≤ MAX_M.

    ``out_dtype`` defaults to x2's dtype for bf16/fp16 inputs and bf16 for fp32 inputs.
    ``block_n`` (weight rows per program), ``block_k`` (codes per K step) and ``num_warps``
    and ``num_stages`` (Triton's software pipelining of the K loop) override :func:`default_config`;
    benchmarks/bench_int4_gemv.py sweeps all four.
    """
    out_dtype = _validate(x2, packed, zero, w_scale, bias, out_dtype)
    m, n, kb = x2.shape[0], packed.shape[0], packed.shape[1]
    cfg = default_config(m)
    block_n = block_n or cfg["block_n"]
    block_k = block_k or cfg["block_k"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    _check_pow2("block_n", block_n, 1)
    _check_pow2("block_k", block_k, 16)
    _check_pow2("num_warps", num_warps, 1)
    y = torch.empty(m, n, dtype=out_dtype, device=x2.device)
    if m == 0 or n == 0:
        return y
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    packed = packed if packed.stride(1) == 1 else packed.contiguous()
    z = zero.reshape(n).to(torch.float32).contiguous()
    s = w_scale.reshape(n).to(torch.float32).contiguous()
    b = bias.reshape(n).contiguous() if bias is not None else s          # dummy pointer when HAS_BIAS is off
    key = (m, n, kb * 2, block_n, block_k, num_warps)
    if key not in _LOGGED_CONFIGS:
        _LOGGED_CONFIGS.add(key)
        log.debug("int4 GEMV M=%d N=%d K=%d: block_n=%d block_k=%d num_warps=%d", *key)
    grid = (triton.cdiv(n, block_n),)
    int4_gemv_kernel[grid](x2, packed, z, s, b, y, m, n, 2 * kb, x2.stride(0), packed.stride(0), y.stride(0),
                           HAS_BIAS=bias is not None, BLOCK_M=triton.next_power_of_2(max(m, 1)),
                           BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return y


def int4_linear_reference(x2: torch.Tensor, packed: torch.Tensor, zero: torch.Tensor, w_scale: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Torch reference in fp32: Ŵ = (q − z)·Δ, y = x·Ŵᵀ + b, cast to out_dtype (as the emulated path).

    Any M (no MAX_M limit): the weight-only op runs it for M > MAX_M."""
    from ..numerics.packing import unpack_int4

    out_dtype = _validate(x2, packed, zero, w_scale, bias, out_dtype, check_m=False)
    n = packed.shape[0]
    w = (unpack_int4(packed).float() - zero.reshape(n, 1).float()) * w_scale.reshape(n, 1).float()
    y = x2.float() @ w.t()
    if bias is not None:
        y = y + bias.reshape(n).float()
    return y.to(out_dtype)
