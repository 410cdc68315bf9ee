"""W4A8/W4A4 GEMM with the int4 → FP8 unpack inside the Triton mainloop (the alternative to expanding).

Why it exists: the FP8 path expands the packed int4 weight into a pooled FP8 buffer before each
``torch._scaled_mm`` (:mod:`.expand`, one memory-bound pass of N·K/2 bytes in and N·K out). The other
design issue #5 asks to measure reads the packed bytes *inside* the GEMM: each (BLOCK_N, BLOCK_K)
weight tile is loaded as (BLOCK_N, BLOCK_K/2) bytes, split into nibbles, q − z converted to e4m3 in
registers, and fed to an FP8 ``tl.dot`` — no expanded copy at all, half the weight bytes read. The
price is ALU work per weight element in every output tile's mainloop (amortised over BLOCK_M rows)
and Triton's GEMM instead of cuBLAS'. ``benchmarks/bench_w4_gemm.py`` measures both designs side by
side. Measured on an H200 at M = 16k (docs/results/speed.md §0): this kernel takes 1.95–2.24× the time
of expansion + cuBLAS (0.70–0.78× bf16), so the FP8 path keeps the expansion; this module stays as
the tested, measured alternative (and the starting point should a faster mainloop appear).

Computes the same function as :func:`.fp8.gemm_rowwise` on the expanded weight::

    y[m, n] = s[m] · Δ[n] · Σ_k c[m, k] · (q[n, k] − z[n])  (+ b[n])

with fp8 codes c (M, K) (int-grid A4 codes or e4m3 A8 values), per-token scales s (M, 1), packed
int4 q (N, K/2) (low nibble = even k), integer zero points z (N, 1) and steps Δ (N, 1). For A4 the
sums are integers below 2^22, exact in the tensor cores' accumulator (as in cuBLAS with
``use_fast_accum=False``); for A8 e4m3 values Triton's fp8 ``tl.dot`` accumulates like cuBLAS' fast
accumulation (reduced-precision partial sums: 3e-4 – 2e-3 rel. apart on the H200). The epilogue
multiplies by s·Δ in fp32 and rounds once to the output dtype.

Under ``TRITON_INTERPRET=1`` (CI) the dot runs in IEEE fp32 on the same e4m3-valued operands (fp8
``tl.dot`` has no CPU implementation there); every product and partial sum is exact either way.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..errors import ConfigError
from .triton_act_quant import interpreting

# Launch parameters; benchmarks/bench_w4_gemm.py sweeps alternatives.
DEFAULT_CONFIG = {"block_m": 128, "block_n": 128, "block_k": 128, "group_m": 8, "num_warps": 8, "num_stages": 3}


@triton.jit
def tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile (pid_m, pid_n) of program / work item ``pid`` of an (M, N) GEMM.

    Tiles are ordered in groups of GROUP_M row tiles, so consecutive programs share weight tiles
    in L2 (the usual grouped ordering)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile of an (M, N) GEMM: row indices (BLOCK_M,) and column indices (BLOCK_N,),
    in :func:`tile_coords` order."""
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def w4_fp8_gemm_kernel(a_ptr, sa_ptr, p_ptr, z_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K,
                       stride_am, stride_pn, stride_cm,
                       HAS_BIAS: tl.constexpr, IEEE_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N),), programs ordered in groups of GROUP_M row tiles
    (so consecutive programs share weight tiles in L2). K % BLOCK_K == 0 (checked by the launcher)."""
    rm, rn = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)             # (BLOCK_M,) rows, (BLOCK_N,) channels
    m_ok, n_ok = rm < M, rn < N
    rk = tl.arange(0, BLOCK_K)
    rj = tl.arange(0, BLOCK_K // 2)                                    # packed byte j ↔ codes 2j, 2j+1
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]          # (BLOCK_M, BLOCK_K) fp8
    p_ptrs = p_ptr + rn.to(tl.int64)[:, None] * stride_pn + rj[None, :]          # (BLOCK_N, BLOCK_K/2) uint8
    z = tl.load(z_ptr + rn, mask=n_ok, other=0.0)[:, None]                      # (BLOCK_N, 1) fp32 integers
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs + k0, mask=m_ok[:, None], other=0.0)
        byte = tl.load(p_ptrs + k0 // 2, mask=n_ok[:, None], other=0).to(tl.int32)
        w_even = (byte & 0xF).to(tl.float32) - z                       # q[n, k0 + 2j] − z[n], in [−15, 15]
        w_odd = ((byte >> 4) & 0xF).to(tl.float32) - z                 # q[n, k0 + 2j + 1] − z[n]
        w = tl.reshape(tl.join(w_even, w_odd), (BLOCK_N, BLOCK_K))     # (BLOCK_N, BLOCK_K) in k order
        if IEEE_DOT:                                                   # interpreter: exact fp32 dot
            acc = tl.dot(a.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:                                                          # e4m3 × e4m3 tensor cores, fp32 acc
            acc = tl.dot(a, tl.trans(w.to(tl.float8e4nv)), acc)
    sa = tl.load(sa_ptr + rm, mask=m_ok, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=n_ok, other=0.0)
    y = acc * sa[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def w4_fp8_gemm(q: torch.Tensor, s: torch.Tensor, packed: torch.Tensor, zero: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
                config: Optional[dict] = None) -> torch.Tensor:
    """q (M, K) float8_e4m3fn codes, s (M, 1) fp32, packed (N, K/2) uint8, zero / w_scale (N, 1) → (M, N).

    ``config`` overrides :data:`DEFAULT_CONFIG` (block_m, block_n, block_k, group_m, num_warps, num_stages).
    """
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    if q.dtype != torch.float8_e4m3fn or q.dim() != 2 or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ConfigError(f"w4_fp8_gemm takes fp8 codes (M, K) and packed uint8 (N, K/2), got {q.dtype} "
                          f"{tuple(q.shape)} and {packed.dtype} {tuple(packed.shape)}")
    m, k = q.shape
    n = packed.shape[0]
    if packed.shape[1] * 2 != k or k % cfg["block_k"]:
        raise ConfigError(f"K={k} must equal 2 × {packed.shape[1]} and be a multiple of block_k={cfg['block_k']}")
    if s.numel() != m or zero.numel() != n or w_scale.numel() != n or (bias is not None and bias.numel() != n):
        raise ConfigError("w4_fp8_gemm needs one scale per token and one zero point / step (/ bias) per channel")
    q = q if q.stride(1) == 1 else q.contiguous()
    packed = packed if packed.stride(1) == 1 else packed.contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=q.device)
    if m == 0 or n == 0:
        return out
    flat = [t.reshape(-1).float().contiguous() for t in (s, zero, w_scale)]
    grid = (triton.cdiv(m, cfg["block_m"]) * triton.cdiv(n, cfg["block_n"]),)
    w4_fp8_gemm_kernel[grid](
        q, flat[0], packed, flat[1], flat[2], bias if bias is not None else flat[2], out, m, n, k,
        q.stride(0), packed.stride(0), out.stride(0), HAS_BIAS=bias is not None, IEEE_DOT=interpreting(),
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], GROUP_M=cfg["group_m"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
