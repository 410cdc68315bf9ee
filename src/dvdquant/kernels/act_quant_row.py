"""Single-pass per-token activation quantization: each token row stays in registers.

Why this kernel
---------------
A per-token scale needs the amax of the whole (rotated) row before any element can be
quantized. The two-pass kernel of :mod:`.triton_act_quant` tiles 64 rows × 128 channels, so
it must read every row twice; at K = 12288–15360 (the MLP down projections of HunyuanVideo
and Wan) the 64-row band of one program is 1.5–2 MB, all programs together far more than L2,
and the second read comes from HBM: the kernel cost 0.475 ms for a 16k × 12288 bf16 input
whose plain bf16 → fp8 copy takes 0.186 ms (H200, docs/results/speed.md §0).

Here the *blocks of one row* are the rows of the ``tl.dot``: a program loads ``ROWS`` whole
token rows as a (ROWS·NB, TILE) tile — NB = next power of two of K / TILE, the k-blocks of a
row, padding blocks masked to zero — rotates it with one dot against the (TILE, TILE)
block-diagonal ±1 matrix, reduces |x| per tile row and then per token, quantizes and writes.
One read, one write: the traffic of the copy floor. A row of K ≤ 16384 fp32 values spread over
the program's threads is 32–64 registers each.

Layout of the tile (i = 0 … ROWS·NB − 1)::

    token row  m = pid·ROWS + i // NB
    k-block    b = i % NB            channels b·TILE … b·TILE + TILE − 1   (masked: b·TILE ≥ K)

What it computes is exactly what the two-pass kernel computes (same ±1 dot of bf16/fp16 values
with fp32 sums, same ``· fp32(1/√R)``, same quantizer from :mod:`.quant_jit`): the tests compare
the two bit for bit.

Scope (anything else goes to the two-pass kernel, see :func:`row_kernel_fits`): per-token scales,
no static smoothing, rotation off or a Hadamard block of order R (power of two, 16 ≤ R ≤ 128) with
bf16/fp16 tokens and K a multiple of 128, and NB·TILE·ROWS within the register budget.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .quant_jit import bad_rows, flag_nonfinite, quantize_codes, row_abs_max, scale_of

TILE = 128                 # channels per k-block: the ±1 tile of the rotation (R | 128)
# Elements of one program's tile (ROWS · NB · TILE) and warps, by the padded row length NB · TILE;
# the values of the H200 sweep (benchmarks/tune_act_quant.py --kernel row, docs/results/speed.md).
ROW_CONFIG = {"max_elems": 16384, "num_warps": 8, "num_stages": 3, "programs_per_sm": 2}
MAX_ROW = 16384            # longest padded row (NB · TILE) kept in registers


@triton.jit(do_not_specialize=["flag_id"])
def act_quant_row_kernel(x_ptr, h_ptr, q_ptr, s_ptr, flag_ptr, flag_id,
                         M, K, stride_xm, stride_qm, stride_sm, qmax, inv_qmax, inv_sqrt_r,
                         ROWS: tl.constexpr, NB: tl.constexpr, TILE: tl.constexpr, ROTATE: tl.constexpr,
                         IEEE_DOT: tl.constexpr, FP8_FMT: tl.constexpr, SCALE_BY_RECIP: tl.constexpr,
                         HAS_FLAG: tl.constexpr):
    """Persistent grid (≤ #SMs × k programs); program p quantizes the row groups p, p + P, p + 2P, …
    (ROWS whole token rows each) in one pass. The loop lets the software pipeliner prefetch the
    next groups' rows (``num_stages``) while the current one is rotated and written."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    i = tl.arange(0, ROWS * NB)
    r_in = i // NB                                               # (ROWS·NB,) token within the group
    kk = tl.arange(0, TILE)
    cols = (i % NB)[:, None] * TILE + kk[None, :]                # (ROWS·NB, TILE) channel index
    mask_c = cols < K
    x_offs = r_in[:, None] * stride_xm + cols                    # relative to the group's first row
    q_offs = r_in[:, None] * stride_qm + cols
    t_in = tl.arange(0, ROWS)
    if ROTATE:
        h = tl.load(h_ptr + kk[:, None] * TILE + kk[None, :])    # (TILE, TILE) ±1, loaded once
    bad = tl.zeros((ROWS,), dtype=tl.int32)
    for g in range(pid, tl.cdiv(M, ROWS), nprog):
        row0 = tl.cast(g, tl.int64) * ROWS                       # int64: M·K may exceed 2^31
        mask = ((row0 + r_in) < M)[:, None] & mask_c
        x = tl.load(x_ptr + row0 * stride_xm + x_offs, mask=mask, other=0.0)
        if ROTATE:
            if IEEE_DOT:                                         # interpreter: bf16 dot is broken there
                xr = tl.dot(x.to(tl.float32), h, input_precision="ieee")
            else:                                                # ±1 · bf16 exact, fp32 sums
                xr = tl.dot(x, h)
            xr = xr * inv_sqrt_r
        else:
            xr = x.to(tl.float32)
        part = row_abs_max(xr)                                   # (ROWS·NB,) per k-block
        amax = tl.max(tl.reshape(part, (ROWS, NB)), axis=1)      # (ROWS,) per token
        mask_t = (row0 + t_in) < M
        s = scale_of(amax, qmax, inv_qmax, SCALE_BY_RECIP)      # (ROWS,)
        s_tile = tl.reshape(tl.broadcast_to(s[:, None], (ROWS, NB)), (ROWS * NB,))
        c = quantize_codes(xr, s_tile, qmax, FP8_FMT)
        tl.store(q_ptr + row0 * stride_qm + q_offs, c.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + (row0 + t_in) * stride_sm, s, mask=mask_t)
        bad = tl.maximum(bad, bad_rows(s, mask_t))
    if HAS_FLAG:
        flag_nonfinite(flag_ptr, flag_id, bad)


def padded_blocks(k: int) -> int:
    """NB: k-blocks of TILE channels per row, rounded up to a power of two (≥ 16 // ROWS is the
    launcher's business)."""
    return triton.next_power_of_2(triton.cdiv(k, TILE))


def row_kernel_fits(x: torch.Tensor, r: Optional[int], block: Optional[int], smooth) -> bool:
    """Whether :func:`act_quant_row` computes this case (else the two-pass kernel does)."""
    k = x.shape[1]
    if block is not None or smooth is not None or padded_blocks(k) * TILE > MAX_ROW:
        return False
    if r is None:
        return True
    return (x.dtype in (torch.bfloat16, torch.float16) and r & (r - 1) == 0 and 16 <= r <= TILE
            and k % TILE == 0)


def launch_rows(nb: int, config: Optional[dict] = None) -> tuple[int, int, int, int]:
    """(ROWS, num_warps, num_stages, programs per SM) for a row of NB padded k-blocks: as many rows
    per group as fit ``max_elems``, and at least 16 tile rows in all (``tl.dot``'s minimum M)."""
    cfg = dict(ROW_CONFIG, **(config or {}))
    rows = max(1, cfg["max_elems"] // (nb * TILE))
    rows = max(rows, triton.cdiv(16, nb))
    return triton.next_power_of_2(rows), cfg["num_warps"], cfg["num_stages"], cfg["programs_per_sm"]


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2                # interpreter: a small persistent grid, so the tests run the loop
    return torch.cuda.get_device_properties(device).multi_processor_count


def act_quant_row(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, *, qmax: float, inv_qmax: float,
                  fp8_fmt: bool, h_tile: Optional[torch.Tensor], inv_sqrt_r: float, ieee_dot: bool,
                  flag: torch.Tensor, flag_id: int, has_flag: bool, config: Optional[dict] = None) -> None:
    """Launch the kernel: x (M, K) → codes (M, K) fp8 and scales (M, 1) fp32, written in place.

    ``h_tile``: the (TILE, TILE) block-diagonal ±1 matrix (x's dtype, fp32 under ``ieee_dot``) or
    None for no rotation. Arguments are checked by :func:`~.triton_act_quant.act_quant`.
    """
    m, k = x.shape
    nb = padded_blocks(k)
    rows, warps, stages, per_sm = launch_rows(nb, config)
    grid = (max(1, min(triton.cdiv(m, rows), per_sm * _sm_count(x.device))),)
    act_quant_row_kernel[grid](
        x, h_tile if h_tile is not None else x, codes, scales, flag, int(flag_id),
        m, k, x.stride(0), codes.stride(0), scales.stride(0), qmax, inv_qmax, inv_sqrt_r,
        ROWS=rows, NB=nb, TILE=TILE, ROTATE=h_tile is not None, IEEE_DOT=ieee_dot, FP8_FMT=fp8_fmt,
        SCALE_BY_RECIP=x.is_cuda, HAS_FLAG=has_flag, num_warps=warps, num_stages=stages)
