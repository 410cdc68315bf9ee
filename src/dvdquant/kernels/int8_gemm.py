"""INT8 tensor-core GEMM with the emulated path's epilogue fused: the exact int-grid linear.

On the fp8 path (``set_backend(..., int8_gemm=True)``, the default) int-grid activation steps run on
their own grid (int8 codes, |c| ≤ 127) against int8 weights q − z (|w| ≤ 15): the 6–8-bit steps
everywhere (their codes are not all e4m3 values), and on sm90 the ≤ 5-bit ones too (the persistent
TMA kernel below). Unlike ``torch._int_mm`` (an int32 (M, N) output, then more passes to scale it),
this kernel keeps the int32 accumulator in registers and applies the epilogue before its single store::

    y[m, n] = bf16( ((fp32(acc[m, n]) · Δ[n]) · s[m]) + b[n] )      acc = Σ_k c[m, k] · w[n, k] (int32)

in that order, one rounding per operation, with floating-point contraction off
(``enable_fp_fusion=False``) so no multiply-add is fused into an FMA. The int32 → fp32 conversion
rounds to nearest even, like the emulated path's exact sum rounded once, so the outputs equal
:func:`dvdquant.numerics.linear.linear_per_token_per_channel` bit for bit (GPU test).
The int32 sum cannot overflow: |acc| ≤ 127 · 15 · K < 2^31 for K < 1.1 M.

Under ``TRITON_INTERPRET=1`` (CI) the dot runs on int32 copies of the operands; the sums are the
same integers.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..errors import ConfigError
from .env import interpreting

# Launch parameters (tiles, warps, stages; the same for the persistent TMA kernel and the pointer kernel that
# serves GPUs without TMA). docs/KERNELS.md says how they were chosen.
DEFAULT_CONFIG = {"block_m": 128, "block_n": 256, "block_k": 128, "group_m": 8, "num_warps": 8, "num_stages": 4,
                  "tma": False}


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
def int8_gemm_kernel(a_ptr, s_ptr, w_ptr, d_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_cm,
                     HAS_BIAS: tl.constexpr, INT32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N),), programs grouped by GROUP_M row tiles (L2 reuse of
    weight tiles). a (M, K) int8 row-major, w (N, K) int8 row-major, K % BLOCK_K == 0 (launcher)."""
    rm, rn = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)             # (BLOCK_M,) rows, (BLOCK_N,) channels
    m_ok, n_ok = rm < M, rn < N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]          # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]          # (BLOCK_K, BLOCK_N) = wᵀ tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs + k0, mask=m_ok[:, None], other=0)
        w = tl.load(w_ptrs + k0, mask=n_ok[None, :], other=0)
        if INT32_DOT:                                                  # interpreter: the same integer sums
            acc += tl.sum(a.to(tl.int32)[:, :, None] * w.to(tl.int32)[None, :, :], axis=1)
        else:                                                          # int8 × int8 tensor cores, int32 acc
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    _store_epilogue(acc, rm, rn, M, N, s_ptr, d_ptr, bias_ptr, c_ptr, stride_cm, HAS_BIAS)


@triton.jit
def _store_epilogue(acc, rm, rn, M, N, s_ptr, d_ptr, bias_ptr, c_ptr, stride_cm, HAS_BIAS: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) int32 → c[rm, rn] = ((fp32(acc) · Δ[rn]) · s[rm]) + b[rn], one store."""
    m_ok, n_ok = rm < M, rn < N
    s = tl.load(s_ptr + rm, mask=m_ok, other=0.0)
    d = tl.load(d_ptr + rn, mask=n_ok, other=0.0)
    y = (acc.to(tl.float32) * d[None, :]) * s[:, None]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def int8_gemm_tma_kernel(a_desc, w_desc, s_ptr, d_ptr, bias_ptr, c_ptr, M, N, K, stride_cm,
                         HAS_BIAS: tl.constexpr, INT32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         NUM_PROGRAMS: tl.constexpr):
    """The same GEMM with its operand tiles read through tensor descriptors (TMA), persistent.

    Grid (NUM_PROGRAMS,): program p computes output tiles p, p + NUM_PROGRAMS, … in
    :func:`tile_coords` order. a_desc: (M, K) int8 codes, tiles [BLOCK_M, BLOCK_K]; w_desc: (N, K) int8
    weights, tiles [BLOCK_N, BLOCK_K]. Rows past M / N and columns past K read as zeros, so K need only be a
    multiple of 16 (the descriptors' stride rule, checked by the launcher)."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS):
        pid_m, pid_n = tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k0])                            # (BLOCK_M, BLOCK_K)
            w = w_desc.load([pid_n * BLOCK_N, k0])                            # (BLOCK_N, BLOCK_K)
            if INT32_DOT:
                acc += tl.sum(a.to(tl.int32)[:, None, :] * w.to(tl.int32)[None, :, :], axis=2)
            else:
                acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _store_epilogue(acc, rm, rn, M, N, s_ptr, d_ptr, bias_ptr, c_ptr, stride_cm, HAS_BIAS)


def int8_gemm(q: torch.Tensor, s: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
              config: Optional[dict] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q (M, K) int8 codes, s (M, 1) fp32, w8 (N, K) int8 (q − z), w_scale (N, 1) → (M, N) ``out_dtype``.

    ``bias`` (N,) any float dtype, added in fp32. ``config`` overrides :data:`DEFAULT_CONFIG`. ``out``: an
    (M, N) ``out_dtype`` tensor with unit column stride (e.g. rows of a larger output) written and returned.
    """
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    if q.dtype != torch.int8 or w8.dtype != torch.int8 or q.dim() != 2 or w8.dim() != 2:
        raise ConfigError(f"int8_gemm takes int8 (M, K) codes and int8 (N, K) weights, got {q.dtype} "
                          f"{tuple(q.shape)} and {w8.dtype} {tuple(w8.shape)}")
    m, k = q.shape
    n = w8.shape[0]
    if w8.shape[1] != k or (k % cfg["block_k"] and not cfg.get("tma")):
        raise ConfigError(f"K={k} must match the weight's {w8.shape[1]} and be a multiple of block_k={cfg['block_k']} "
                          "(the TMA kernel: of 16)")
    if s.numel() != m or w_scale.numel() != n or (bias is not None and bias.numel() != n):
        raise ConfigError("int8_gemm needs one scale per token and one step (/ bias) per output channel")
    q = q if q.stride(1) == 1 else q.contiguous()
    w8 = w8 if w8.stride(1) == 1 else w8.contiguous()
    out = gemm_output(m, n, out_dtype, q.device, out)
    if m == 0 or n == 0:
        return out
    sf, df = s.reshape(-1).float().contiguous(), w_scale.reshape(-1).float().contiguous()
    bf = None if bias is None else bias.reshape(-1).float().contiguous()
    if cfg.get("tma"):
        _launch_tma(q, sf, w8, df, bf, out, cfg)
        return out
    grid = (triton.cdiv(m, cfg["block_m"]) * triton.cdiv(n, cfg["block_n"]),)
    int8_gemm_kernel[grid](
        q, sf, w8, df, bf if bf is not None else df, out, m, n, k, q.stride(0), w8.stride(0), out.stride(0),
        HAS_BIAS=bf is not None, INT32_DOT=interpreting(), BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
        BLOCK_K=cfg["block_k"], GROUP_M=cfg["group_m"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        enable_fp_fusion=False)
    return out


def gemm_output(m: int, n: int, out_dtype: torch.dtype, device, out: Optional[torch.Tensor]) -> torch.Tensor:
    """``out`` checked to be an (m, n) ``out_dtype`` tensor on ``device`` with unit column stride, or a new one."""
    if out is None:
        return torch.empty(m, n, dtype=out_dtype, device=device)
    if tuple(out.shape) != (m, n) or out.dtype != out_dtype or out.device != torch.device(device) or \
            (n > 1 and out.stride(1) != 1):
        raise ConfigError(f"GEMM output must be ({m}, {n}) {out_dtype} on {device} with unit column stride, got "
                          f"{tuple(out.shape)} {out.dtype} on {out.device}, strides {out.stride()}")
    return out


def tma_compatible(q: torch.Tensor, w8: torch.Tensor) -> bool:
    """Whether tensor descriptors can read the int8 (M, K) codes and (N, K) weights: 16-byte aligned bases
    and row strides (so K % 16 == 0)."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in (q, w8)) and q.shape[1] % 16 == 0


def _launch_tma(q, sf, w8, df, bf, out, cfg) -> None:
    """Persistent launch of :func:`int8_gemm_tma_kernel`: ``cfg["programs"]`` programs (default: one
    per SM, or 4 when interpreting), never more than there are tiles."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = q.shape
    n = w8.shape[0]
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    if not tma_compatible(q, w8):
        raise ConfigError(f"the TMA INT8 GEMM needs 16-byte aligned operands and row strides (K={k})")
    programs = min(cfg.get("programs") or (torch.cuda.get_device_properties(q.device).multi_processor_count
                                           if q.is_cuda else 4), triton.cdiv(m, bm) * triton.cdiv(n, bn))
    a_desc = TensorDescriptor.from_tensor(q, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w8, [bn, bk])
    int8_gemm_tma_kernel[(programs,)](
        a_desc, w_desc, sf, df, bf if bf is not None else df, out, m, n, k, out.stride(0),
        HAS_BIAS=bf is not None, INT32_DOT=interpreting(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=cfg["group_m"], NUM_PROGRAMS=programs, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], enable_fp_fusion=False)


def launch_config(q: torch.Tensor, w8: torch.Tensor) -> Optional[dict]:
    """The launch config :func:`int8_gemm` gets on ``q``'s GPU, or None where no tile fits K.

    sm90+: the persistent TMA kernel (needs K % 16 == 0 and 16-byte aligned operands; K need not be a
    multiple of the tile: TMA reads past K as zeros). Otherwise the pointer kernel with the largest
    block_k in (128, 64, 32) dividing K."""
    if q.is_cuda and tma_compatible(q, w8) and torch.cuda.get_device_capability(q.device) >= (9, 0):
        return dict(DEFAULT_CONFIG, tma=True)
    block_k = next((b for b in (128, 64, 32) if q.shape[1] % b == 0), None)
    return None if block_k is None else dict(DEFAULT_CONFIG, block_k=block_k)
