"""Fused activation quantization: (smooth) → Hadamard rotation → per-token amax → FP8 or int8 codes.

One kernel reads the bf16/fp16/fp32 tokens once (twice for per-token scales) and writes 1-byte
codes plus fp32 scales. For each token row ``x`` (K,), the contract of
:mod:`dvdquant.numerics.grids` and of :func:`act_quant_reference` (bit-equal)::

    x  ← x / smooth                      (optional static divisor, fp32, correctly rounded: div_rn)
    x  ← x · blockdiag(H_R, …, H_R)      (optional rotation: numerics.hadamard.rotate_pm1_exact)
    a  = max |x|     over the row, or over each ``BLOCK_K``-wide block (per_block scaling)
    s  = a / qmax    if a > 0 else 1      (qmax = 2^(b−1)−1 for the int grid, 448 for FP8)
    int grid: c = clamp(round_half_even(x / s), −qmax, qmax)    (e4m3 for b ≤ 5, or int8)
    FP8:      c = round_to_e4m3_nearest_even(x / s)

Exactness: division is IEEE round-to-nearest (``div_rn``, or the reciprocal plus one fma
correction, which gives the same quotients: ``quant_jit.quantize_codes_recip``); rounding uses
the exact ``(y + 1.5·2^23) − 1.5·2^23`` trick, e4m3 rounding is done in fp32 at the value's own
exponent before the cast. NaN/Inf inputs make the row's scale +inf (detectable from the scales).

Rotation in the kernel: each (row, R-block) segment is snapped to the grid u = 2^(⌊log2 max⌋ − 14)
(as the torch reference does), multiplied by the ±1 tile with ``tl.dot`` and then by fp32(1/√R);
after the snap every partial sum is an exact multiple of u, so any accumulation order gives the
reference's result. ``ROT_MODE``: 1 — one bf16 dot (bf16 input, no smoothing); 2 — the snapped fp32
tile split exactly into two bf16 parts (for segment maxima below 2^119, where u is not clamped, a snapped
value is n·u with |n| ≤ 2^15; its bf16 rounding, nearest or truncated, leaves a multiple of u below 2^7·u,
which bf16 holds); 3 — three bf16 parts (fp32 without the snap, ``SNAP=False``: close to, not exactly,
the fp32 products); 0 — IEEE fp32 dot (Triton's interpreter only). In-kernel
rotations: R a power of two, 16 ≤ R ≤ 128, R | BLOCK_K, K % BLOCK_K == 0; others are applied by
the caller first (:func:`fusable_rotation`). ``SNAP=False`` (opt-in ``exact_rotation=False``) skips
the snap: cheaper, no longer exact.

Per-token scales take two passes over the row's tiles (amax, then quantize; the first pass can
keep its snap constants for the second: ``SNAP_CACHE``); per-block scales one pass. Launch
parameters: :data:`DEFAULT_CONFIG`, :data:`PER_TOKEN_CONFIG`, :data:`SMALL_M_CONFIG`
(docs/KERNELS.md says how they were chosen).
"""
from __future__ import annotations

import logging
import weakref
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from ..errors import ConfigError
from ..numerics.hadamard import inv_sqrt_r
from .env import interpreting
from .execution import fusable_rotation, is_pow2 as _is_pow2
from .quant_jit import bad_rows, flag_nonfinite, quantize_codes, quantize_codes_recip, recip_ok, row_abs_max, scale_of

log = logging.getLogger(__name__)

FP8_MAX = 448.0


# ---------------------------------------------------------------------------------- kernel
@triton.jit
def snap_magic(x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ROT_R: tl.constexpr):
    """1.5·2^23·u per (row, ROT_R-segment) of the fp32 tile x (BLOCK_M, BLOCK_K), u = 2^(e_max − 14):
    (BLOCK_M,) when one segment spans the tile, else (BLOCK_M, BLOCK_K).

    The same exponent-bit arithmetic as ``numerics.hadamard.snap_magic``; ``(x + m) − m`` then
    rounds x to a multiple of u, half to even."""
    xa = tl.abs(x)
    if ROT_R == BLOCK_K:
        amax = tl.max(xa, axis=1)                                             # (BLOCK_M,)
    else:
        seg = tl.max(tl.reshape(xa, (BLOCK_M, BLOCK_K // ROT_R, ROT_R)), axis=2)
        amax = tl.reshape(tl.broadcast_to(seg[:, :, None], (BLOCK_M, BLOCK_K // ROT_R, ROT_R)),
                          (BLOCK_M, BLOCK_K))
    e = tl.minimum(tl.maximum(amax.to(tl.int32, bitcast=True) >> 23, 15), 245)
    return (((e + 9) << 23) | 0x400000).to(tl.float32, bitcast=True)


@triton.jit
def _rotate_snapped(xf, h, inv_sqrt_r, ROT_MODE: tl.constexpr, SCALE: tl.constexpr):
    """Snapped fp32 tile times the ±1 tile h, exact sums, then · fp32(1/√R) (``SCALE=False``: not yet)."""
    if ROT_MODE == 1:                                     # bf16 in: still bf16 after the snap
        xr = tl.dot(xf.to(tl.bfloat16), h)
    elif ROT_MODE == 2:                                   # snapped fp32: hi + mid, exactly (module doc)
        hi = xf.to(tl.bfloat16)
        mid = (xf - hi.to(tl.float32)).to(tl.bfloat16)
        xr = tl.dot(hi, h)
        xr = tl.dot(mid, h, xr)
    elif ROT_MODE == 3:                                   # unsnapped fp32: hi + mid + lo
        hi = xf.to(tl.bfloat16)
        r1 = xf - hi.to(tl.float32)
        mid = r1.to(tl.bfloat16)
        lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
        xr = tl.dot(hi, h)
        xr = tl.dot(mid, h, xr)
        xr = tl.dot(lo, h, xr)
    else:                                                 # interpreter: IEEE fp32 dot
        xr = tl.dot(xf, h, input_precision="ieee")
    if SCALE:
        xr = xr * inv_sqrt_r
    return xr


@triton.jit
def _load_transformed(x_ptr, smooth_ptr, h_ptr, h, rows, mask_m, k0, K, stride_xm, inv_sqrt_r, magic,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                      ROTATE: tl.constexpr, ROT_MODE: tl.constexpr, HOIST_H: tl.constexpr, ROT_R: tl.constexpr,
                      MAGIC_IN: tl.constexpr, SNAP: tl.constexpr, SCALE_OUT: tl.constexpr):
    """One (BLOCK_M, BLOCK_K) tile of x / smooth · H in fp32, and the snap constants it used.

    ``SCALE_OUT=False`` leaves the rotated tile without its
    1/√R factor (the first pass scales the row amax instead: x ↦ RN(x/√R) is monotone, so
    max RN(|x|·c) = RN(max |x| · c), one multiply per row instead of one per element).
    ``MAGIC_IN``: ``magic`` (BLOCK_M,) holds this tile's snap constants (computed by an earlier
    pass; only when ROT_R == BLOCK_K); otherwise they are computed here. ``SNAP=False`` (the
    opt-in ``exact_rotation=False``) skips the snap: the rotation is then no longer the exact one."""
    cols = k0 + tl.arange(0, BLOCK_K)
    if ROTATE and not HOIST_H:      # re-read H (L2-resident) so the pipeliner stages it in SMEM
        hk = tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + hk[:, None] * BLOCK_K + hk[None, :])
    mask = mask_m[:, None] & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    if HAS_SMOOTH:
        sm = tl.load(smooth_ptr + cols, mask=cols < K, other=1.0)
        x = tl.math.div_rn(x.to(tl.float32), sm[None, :])
    xf = x.to(tl.float32)
    if ROTATE:
        if SNAP:
            if not MAGIC_IN:
                magic = snap_magic(xf, BLOCK_M, BLOCK_K, ROT_R)
            if ROT_R == BLOCK_K:
                xf = (xf + magic[:, None]) - magic[:, None]
            else:
                xf = (xf + magic) - magic
        return _rotate_snapped(xf, h, inv_sqrt_r, ROT_MODE, SCALE_OUT), magic
    return xf, magic


@triton.jit(do_not_specialize=["flag_id"])   # layer ids vary per call: no recompile for id 1 or 16·k
def act_quant_kernel(x_ptr, smooth_ptr, h_ptr, q_ptr, s_ptr, flag_ptr, flag_id, magic_ptr,
                     M, K, stride_xm, stride_qm, stride_sm, stride_sg, qmax, inv_qmax, inv_sqrt_r,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                     ROTATE: tl.constexpr, ROT_MODE: tl.constexpr, PER_BLOCK: tl.constexpr,
                     FP8_FMT: tl.constexpr, SCALE_BY_RECIP: tl.constexpr, HOIST_H: tl.constexpr,
                     HAS_FLAG: tl.constexpr, ROT_R: tl.constexpr, SNAP: tl.constexpr, SNAP_CACHE: tl.constexpr,
                     FMA_DIV: tl.constexpr = False):
    """Grid: (cdiv(M, BLOCK_M),). Each program quantizes BLOCK_M whole rows.

    Per-token mode reads each row twice. ``FMA_DIV``: the
    second pass divides by the row scale through its reciprocal and one fma correction
    (:func:`.quant_jit.quantize_codes_recip`) when every row of the program allows it, else with ``div_rn``.
    ``HAS_FLAG``: rows whose scale came out +inf (NaN/Inf input) write ``flag_id`` into the
    device flag at ``flag_ptr`` (atomic min; see :mod:`dvdquant.kernels.finite`).
    ``SNAP_CACHE`` (per-token mode, one rotation block per tile): the first pass stores each
    tile's snap constants (BLOCK_M,) at ``magic_ptr`` (K / BLOCK_K, M) fp32 (coalesced along M),
    the second reads them back instead of recomputing the segment maxima."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < M
    bad = tl.zeros((BLOCK_M,), dtype=tl.int32)
    h = None
    if ROTATE and HOIST_H:
        hk = tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + hk[:, None] * BLOCK_K + hk[None, :])
    no_magic = tl.zeros((BLOCK_M,), dtype=tl.float32)     # placeholder: tiles compute their own constants
    if PER_BLOCK:                       # one pass: every BLOCK_K tile is its own scale group
        for k0 in range(0, K, BLOCK_K):
            x, _ = _load_transformed(x_ptr, smooth_ptr, h_ptr, h, rows, mask_m, k0, K, stride_xm, inv_sqrt_r,
                                     no_magic, BLOCK_M, BLOCK_K, HAS_SMOOTH, ROTATE, ROT_MODE, HOIST_H, ROT_R,
                                     False, SNAP, True)
            s = scale_of(row_abs_max(x), qmax, inv_qmax, SCALE_BY_RECIP)
            bad = tl.maximum(bad, bad_rows(s, mask_m))
            c = quantize_codes(x, s, qmax, FP8_FMT)
            cols = k0 + tl.arange(0, BLOCK_K)
            tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], c.to(q_ptr.dtype.element_ty),
                     mask=mask_m[:, None] & (cols[None, :] < K))
            tl.store(s_ptr + rows * stride_sm + (k0 // BLOCK_K) * stride_sg, s, mask=mask_m)
    else:                               # two passes: row amax, then quantize
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x, tile_magic = _load_transformed(x_ptr, smooth_ptr, h_ptr, h, rows, mask_m, k0, K, stride_xm,
                                              inv_sqrt_r, no_magic, BLOCK_M, BLOCK_K, HAS_SMOOTH, ROTATE, ROT_MODE,
                                              HOIST_H, ROT_R, False, SNAP, False)
            if SNAP_CACHE:
                tl.store(magic_ptr + rows.to(tl.int64) + (k0 // BLOCK_K) * M, tile_magic, mask=mask_m)
            amax = tl.maximum(amax, row_abs_max(x))
        if ROTATE:
            amax = amax * inv_sqrt_r                      # the 1/√R factor the first pass left out
        s = scale_of(amax, qmax, inv_qmax, SCALE_BY_RECIP)
        bad = bad_rows(s, mask_m)
        if FMA_DIV:
            fast = recip_ok(s, mask_m)
            r = tl.math.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), s)
        for k0 in range(0, K, BLOCK_K):
            if SNAP_CACHE:
                cached = tl.load(magic_ptr + rows.to(tl.int64) + (k0 // BLOCK_K) * M, mask=mask_m, other=0.0)
            else:
                cached = no_magic
            x, _ = _load_transformed(x_ptr, smooth_ptr, h_ptr, h, rows, mask_m, k0, K, stride_xm, inv_sqrt_r,
                                     cached, BLOCK_M, BLOCK_K, HAS_SMOOTH, ROTATE, ROT_MODE, HOIST_H, ROT_R,
                                     SNAP_CACHE, SNAP, True)
            if FMA_DIV:
                if fast:
                    c = quantize_codes_recip(x, s, r, qmax, FP8_FMT)
                else:
                    c = quantize_codes(x, s, qmax, FP8_FMT)
            else:
                c = quantize_codes(x, s, qmax, FP8_FMT)
            cols = k0 + tl.arange(0, BLOCK_K)
            tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], c.to(q_ptr.dtype.element_ty),
                     mask=mask_m[:, None] & (cols[None, :] < K))
        tl.store(s_ptr + rows * stride_sm, s, mask=mask_m)
    if HAS_FLAG:
        flag_nonfinite(flag_ptr, flag_id, bad)


# ---------------------------------------------------------------------------------- launcher
# Launch parameters (tuned on an H100, see docs/KERNELS.md).
DEFAULT_CONFIG = {"block_m": 64, "num_warps": 8, "num_stages": 3, "hoist_h": True, "block_k": 256}


# Few tokens (text conditioning: 256–512 rows) fill too few SMs with 64-row programs: below one wave of
# 64-row programs the launcher takes 16-row programs (4 warps) instead, 4× the programs.
SMALL_M_CONFIG = {"block_m": 16, "num_warps": 4}

# Per-token scales (two passes): the second pass divides by the row scale through its reciprocal and one
# fma correction instead of IEEE div.rn (same quotients, see quant_jit.quantize_codes_recip), 4 warps per
# 64-row program (two programs per SM).
PER_TOKEN_CONFIG = {"num_warps": 4, "fma_div": True}


@lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def rows_config(m: int, n_sm: int, config: Optional[dict], per_token: bool = True) -> dict:
    """Launch parameters of :func:`act_quant_kernel` for M tokens on a GPU with ``n_sm`` SMs: the tuned
    :data:`DEFAULT_CONFIG` (with :data:`PER_TOKEN_CONFIG` on top for per-token scales), or
    :data:`SMALL_M_CONFIG` where 64-row programs would not fill one wave. Keys given in ``config``
    always win."""
    cfg = dict(DEFAULT_CONFIG, **(PER_TOKEN_CONFIG if per_token else {}))
    if "block_m" not in (config or {}) and 0 < n_sm and triton.cdiv(m, cfg["block_m"]) < n_sm:
        cfg.update(SMALL_M_CONFIG)
    cfg.update(config or {})
    return cfg


@lru_cache(maxsize=16)
def _signed_tile(h_bytes: bytes, r: int, tile: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    h = torch.frombuffer(bytearray(h_bytes), dtype=torch.float32).reshape(r, r)
    sign = torch.sign(h)
    return torch.block_diag(*([sign] * (tile // r))).to(dtype=dtype, device=device).contiguous()


_TILES: dict = {}   # (id(h_block), version, tile, dtype, device) → (weakref to h_block, ±1 tile)


def tensor_version(t: torch.Tensor) -> int:
    """In-place version counter of ``t`` (for caches keyed on a tensor); −1 for inference tensors
    (made under ``torch.inference_mode``), which have none."""
    return -1 if t.is_inference() else t._version


def _hadamard_tile(h_block: torch.Tensor, tile: int, dtype: torch.dtype, device) -> torch.Tensor:
    """blockdiag(±1 pattern of ``h_block``) of order ``tile``, cached per block tensor, dtype, device.

    The sign pattern is read on the host, which for a CUDA ``h_block`` is a device→host copy, i.e.
    a synchronisation; it happens once per (tensor, in-place version), not once per call, so the
    hot path never blocks the CPU.
    """
    # an in-place write to an inference-mode block is not noticed (blocks are built once, never written)
    key = (id(h_block), tensor_version(h_block), tile, dtype, str(device))
    hit = _TILES.get(key)
    if hit is not None and hit[0]() is h_block:
        return hit[1]
    r = h_block.shape[0]
    hc = h_block.detach().float().cpu().contiguous()
    if not torch.allclose(hc.abs() * r ** 0.5, torch.ones_like(hc), atol=1e-5):
        raise ConfigError("the fused rotation needs a normalised ±1/√R Hadamard block")
    out = _signed_tile(hc.numpy().tobytes(), r, tile, dtype, str(device))
    if len(_TILES) > 64:                # blocks are few (one per order and device); bound it anyway
        _TILES.clear()
    _TILES[key] = (weakref.ref(h_block), out)
    return out


def act_quant(x: torch.Tensor, *, bits: int, fmt: str = "int", smooth: Optional[torch.Tensor] = None,
              h_block: Optional[torch.Tensor] = None, block: Optional[int] = None,
              scales_k_major: bool = False, config: Optional[dict] = None,
              nonfinite_flag: Optional[torch.Tensor] = None, flag_id: int = 0,
              codes_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize tokens ``x`` (M, K) bf16/fp16/fp32 to FP8 (or int8) codes (M, K) and fp32 scales (M, G).

    ``fmt``: ``"int"`` (symmetric ``bits``-bit grid, bits ≤ 5 so codes are exact in e4m3) or
    ``"fp8"`` (e4m3 values, ``s = amax/448``). ``codes_dtype=torch.int8`` stores int-grid codes
    of up to 8 bits as int8 instead (for the INT8 tensor-core GEMM). ``smooth`` (K,) divides x first; ``h_block``
    (R, R) is a normalised Hadamard block applied block-diagonally (see :func:`fusable_rotation`).
    ``block``: channels per scale (per_block scaling; G = K / block), None for per token (G = 1).
    ``scales_k_major``: return the (M, G) scales as a transposed view of a contiguous (G, M)
    buffer, the layout ``_scaled_mm``'s 1×128 blockwise scaling wants.
    ``config``: launch parameters overriding :data:`DEFAULT_CONFIG` (block_m, num_warps,
    num_stages, hoist_h, block_k for the unrotated case; ``snap_cache``: keep the first pass's
    snap constants for the second, default on; ``snap=False``: skip the snap, which makes the
    rotation inexact — ``set_backend(..., exact_rotation=False)``; per token, :data:`PER_TOKEN_CONFIG`
    on top: ``fma_div`` — divide through the reciprocal, same bits —, 4 warps).
    ``nonfinite_flag``: a (1,) int32 device tensor; if any row's input held NaN/Inf (scale +inf)
    the kernel writes ``min(flag, flag_id)`` into it — detection without a host sync
    (:mod:`dvdquant.kernels.finite`).
    """
    if x.dim() != 2:
        raise ConfigError(f"act_quant expects 2-D tokens (M, K), got shape {tuple(x.shape)}")
    if fmt not in ("int", "fp8"):
        raise ConfigError(f"unknown activation format {fmt!r}")
    if codes_dtype not in (torch.float8_e4m3fn, torch.int8) or (codes_dtype == torch.int8 and fmt != "int"):
        raise ConfigError(f"codes are stored as float8_e4m3fn, or as int8 for the int grid (got {codes_dtype}, {fmt!r})")
    if fmt == "int" and codes_dtype == torch.int8 and not 2 <= bits <= 8:
        raise ConfigError(f"int8 codes hold 2..8-bit grids, got {bits} bits")
    if fmt == "int" and codes_dtype != torch.int8 and not 2 <= bits <= 5:
        raise ConfigError(f"int-grid codes of {bits} bits are not all exact in FP8 e4m3 (need 2..5; int8 codes for more)")
    m, k = x.shape
    r = None if h_block is None else h_block.shape[0]
    cfg = rows_config(m, _sm_count(x.device.index or 0) if x.is_cuda else 0, config, per_token=block is None)
    if not fusable_rotation(k, r, block):
        raise ConfigError(f"rotation of order {r} cannot be fused for K={k}, block={block}: rotate first")
    if block is not None and (not _is_pow2(block) or k % block):
        raise ConfigError(f"scale block {block} must be a power of two dividing K={k}")
    tile = block if block else (max(r, 64) if r else cfg["block_k"])
    g = k // block if block else 1
    x = x if x.stride(-1) == 1 else x.contiguous()
    codes = torch.empty(m, k, dtype=codes_dtype, device=x.device)
    scales = torch.empty(g, m, dtype=torch.float32, device=x.device).t() if scales_k_major \
        else torch.empty(m, g, dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, scales
    has_flag = nonfinite_flag is not None
    if has_flag and (nonfinite_flag.dtype != torch.int32 or nonfinite_flag.numel() != 1
                     or nonfinite_flag.device != x.device):
        raise ConfigError("nonfinite_flag must be a 1-element int32 tensor on the tokens' device")
    flag = nonfinite_flag if has_flag else scales
    qmax = FP8_MAX if fmt == "fp8" else float(2 ** (bits - 1) - 1)
    inv_qmax = float(torch.tensor(1.0, dtype=torch.float32) / qmax)   # fp32 1/qmax, as CUDA torch
    snap = cfg.get("snap", True)
    rot_mode = 0 if interpreting() else (1 if x.dtype == torch.bfloat16 and smooth is None else (2 if snap else 3))
    h = None
    if r:
        h = _hadamard_tile(h_block, tile, torch.float32 if rot_mode == 0 else torch.bfloat16, x.device)
    sm = None if smooth is None else smooth.to(device=x.device, dtype=torch.float32).contiguous()
    grid = (triton.cdiv(m, cfg["block_m"]),)
    snap_cache = bool(r) and snap and block is None and r == tile and cfg.get("snap_cache", True)
    magic = torch.empty(k // tile, m, dtype=torch.float32, device=x.device) if snap_cache else scales
    act_quant_kernel[grid](
        x, sm if sm is not None else x, h if h is not None else x, codes, scales, flag, int(flag_id), magic,
        m, k, x.stride(0), codes.stride(0), scales.stride(0), scales.stride(1), qmax, inv_qmax,
        inv_sqrt_r(r) if r else 1.0,
        BLOCK_M=cfg["block_m"], BLOCK_K=tile, HAS_SMOOTH=sm is not None, ROTATE=h is not None,
        ROT_MODE=rot_mode, PER_BLOCK=block is not None, FP8_FMT=fmt == "fp8",
        SCALE_BY_RECIP=x.is_cuda, HOIST_H=cfg["hoist_h"], HAS_FLAG=has_flag, ROT_R=r or tile, SNAP=snap,
        SNAP_CACHE=snap_cache, FMA_DIV=bool(cfg.get("fma_div", False)), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return codes, scales


# ---------------------------------------------------------------------------------- reference
def act_quant_reference(x: torch.Tensor, *, bits: int, fmt: str = "int",
                        smooth: Optional[torch.Tensor] = None, h_block: Optional[torch.Tensor] = None,
                        block: Optional[int] = None, codes_dtype: torch.dtype = torch.float8_e4m3fn
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of :func:`act_quant` (same contract as ``QuantLinear``'s simulated path).

    The rotation is :func:`dvdquant.numerics.hadamard.rotate_pm1_exact` (snap, exact ±1 sums,
    ``· fp32(1/√R)``), the function the kernels compute exactly: codes and scales are bit-equal.
    """
    from ..numerics.hadamard import rotate_pm1_exact
    from .emulated import quantize_rows

    xf = x.float()
    if smooth is not None:
        xf = xf / smooth.float()
    if h_block is not None:
        xf = rotate_pm1_exact(xf, h_block)
    m, k = xf.shape
    b = block or k
    codes, scale = quantize_rows(xf.reshape(m * (k // b), b), bits, fmt)
    return codes.float().to(codes_dtype).reshape(m, k), scale.reshape(m, k // b)
