"""8-bit attention, the reference: exactly the numerics of the Triton kernel, in plain torch.

The same quantized attention as :mod:`.attention_triton` with ordinary torch ops on any device:
the kernels are tested against it, and CPU runs of a quantized model see the kernel's accuracy.
Derivation: ``docs/ATTENTION.md``.

Layout: diffusers' dispatch layout, ``q`` (B, Lq, H, D), ``k``/``v`` (B, Lk, H, D).
Internally everything is (B, H, L, D).

The scheme (SageAttention-style, data-free: every scale comes from the current tensors):

1. **K smoothing**: K' = K − mean_L(K) per (batch, head, channel). Every score of a query row
   moves by the same q·mean(K), so the softmax, and the output, do not change — but K' has
   no large shared offset, so its 8-bit grid is much finer.
2. **Q and K per token**, INT8 (``qk_format="int8"``, s = amax/127, round half to even) or FP8
   e4m3 (``"fp8"``, s = amax/448). In the kernel a score is t_ij · sq_i · sk_j: a row factor
   and a column factor on the integer dot product, one vector load per key tile.
3. **Online softmax over key tiles of ``block_n``** (FlashAttention), in the log2 domain:
   s = (q8·k8ᵀ) · sq_i · sk_j · scale · log2(e); m = running row max; p = 2^(s − m)
   (computed as 448·p, item 4). The row sum l accumulates the fp32 values.
4. **P in FP8**: p ∈ [0, 1], quantized as e4m3(448·p) (a static scale: the row max maps to
   448, e4m3's largest value). The factor 448 rides in the exponent: p' = 2^(s − (m − log2 448))
   is 448·p up to fp32 rounding, one multiply per score fewer; l sums p' (448 units). Because
   of the online softmax, p is relative to the running max at the tile where it is computed:
   the reference must loop over key tiles in the same order as the kernel to round the same
   values.
5. **V smoothing + per-channel FP8**: V' = V − mean_L(V); v8 = e4m3(V' · 448/amax_L|V'|) per
   (batch, head, channel). Since Σ_j p_j / l = 1, out = (Σ_j p_j v'_j)/l + mean(V) exactly,
   and centring V shrinks both V's and P's rounding errors in absolute terms.
   **Offset correction**: a row that spreads its weight over many keys ("flat" attention) averages
   their codes, so the codes' mean rounding error mean_L(v8 − V'·448/amax) becomes a bias of every
   such row; with bf16 V it is systematic, not a random walk (the bf16 and e4m3 grids alias). The
   output therefore adds v_offset = mean(V) − (amax/448)·mean_L(v8) instead of mean(V) (the centred
   values' mean is 0): exact for uniform p, and for a peaked row a shift far below one code's
   rounding error. Σ_L v8 is summed per key tile of ``block_n`` (the kernel's K/V pass), then over
   the tiles in a fixed order; masked keys count as keys.
6. **Accumulation**: Q·Kᵀ codes sum exactly (int32, or fp32 for e4m3 codes); P·V in fp32,
   tile by tile into one running accumulator rescaled by the online softmax (the kernel lets
   the tensor cores add each tile's products into it).
   out = acc · amax_V'/448 / l' + v_offset; lse = (m + log2 l' − log2 448)·ln 2 + scale·q·mean(K)
   (natural log, of the true scores: smoothing shifted each row by q·mean(K)).

Masks: an additive *key* bias (B, 1 or H, Lk) in natural-log units (−inf = masked), i.e. a
key-padding mask; masks that vary along queries are not handled here (callers fall back to
SDPA). Keys past Lk in the last tile are masked. A row with every key masked outputs v_offset
instead of NaN (l = 0 would divide by zero: the kernel and the reference both clamp l).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..numerics.grids import round_to_e4m3_
from ..numerics.reduce import absmax
from ..numerics.scratch import scratch

DEFAULT_BLOCK_N = 128   # keys per tile of the online softmax (K scales are per key)
BLOCK_N_BY_HEAD_DIM = {64: 64, 128: 128}   # key tile per head_dim (part of the numerics: P is rounded per tile)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
QMAX = {"int8": 127.0, "fp8": 448.0}
P_SCALE = 448.0          # p ∈ [0, 1] → e4m3(448·p)
LOG2_P_SCALE = math.log2(P_SCALE)   # 448 enters as an exponent offset: 2^(s − m + log2 448)
TINY = 1e-30             # amax floor: an all-zero row/block gets codes 0, not NaN
L_FLOOR = 1e-30          # row sum floor: fully masked rows give v_offset, not NaN
QK_FORMATS = tuple(QMAX)
E4M3 = torch.float8_e4m3fn


def block_n_for(head_dim: int) -> int:
    """Keys per tile for ``head_dim``: the tiling of the online softmax (P is quantized per tile
    against the running max, so the reference and the kernel must tile alike)."""
    return BLOCK_N_BY_HEAD_DIM.get(head_dim, DEFAULT_BLOCK_N)


@dataclass
class QuantKV:
    """K and V prepared for the kernel (shared by the reference and the Triton launcher).

    ``k8``: (B, H, Lkp, D) codes (int8 or e4m3), Lkp = Lk rounded up to ``block_n`` (zeros
    past Lk); ``k_scale``: (B, H, Lkp) fp32, one per key (TINY/qmax past Lk); ``v8t``: (B, H, D, Lkp) e4m3 codes of
    V' stored transposed (keys contiguous: the K-major B operand FP8 tensor cores want);
    ``v_scale``: (B, H, D) fp32 = amax_L|V'|/448; ``v_offset``: (B, H, D) fp32, what the output adds
    (:func:`v_offset_reference`, module doc item 5); ``k_mean``: (B, H, D) fp32.
    """

    k8: torch.Tensor
    k_scale: torch.Tensor
    v8t: torch.Tensor
    v_scale: torch.Tensor
    v_offset: torch.Tensor
    k_mean: torch.Tensor
    lk: int
    block_n: int


def round_codes_(y: torch.Tensor, qk_format: str) -> torch.Tensor:
    """fp32 ``y`` (already divided by its scale) → codes as fp32-valued grid points, in ``y`` (returned)."""
    if qk_format == "int8":
        return y.round_().clamp_(-127.0, 127.0)
    return y.copy_(y.clamp_(-448.0, 448.0).to(E4M3))


def kv_stats(k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K mean, V mean and V's per-channel inverse scale 448/amax_L|V − mean|, each (B, H, D) fp32.

    ``k``, ``v``: (B, Lk, H, D). amax|V − m| = max(max V − m, m − min V) (exact: fp32
    rounding is monotonic), so V is read for min/max/mean without a centred copy.
    """
    k_mean = torch.mean(k, dim=1, dtype=torch.float32)            # (B, H, D)
    v_mean = torch.mean(v, dim=1, dtype=torch.float32)
    v_amax = torch.maximum(v.amax(dim=1).float() - v_mean, v_mean - v.amin(dim=1).float())
    v_inv = 448.0 / v_amax.clamp_min(TINY)                        # (B, H, D)
    return k_mean, v_mean, v_inv


def quantize_kv_reference(k: torch.Tensor, v: torch.Tensor, qk_format: str = "int8",
                          block_n: int = DEFAULT_BLOCK_N, stats: Optional[tuple] = None) -> QuantKV:
    """Smooth and quantize K (per key, padded to a multiple of ``block_n``) and V (per channel); see module doc.

    ``stats``: (k_mean, v_mean, v_inv) to use instead of :func:`kv_stats` (tests feed the kernel's
    fixed-order statistics here to compare codes bit for bit).
    """
    k8, k_scale, v8p, v_scale, v_offset, k_mean = _kv_codes(k, v, qk_format, block_n, stats)
    k8 = k8.to(torch.int8) if qk_format == "int8" else k8.to(E4M3)
    return QuantKV(k8, k_scale, v8p.transpose(2, 3).to(E4M3).contiguous(), v_scale, v_offset, k_mean, k.shape[1],
                   block_n)


def _kv_codes(k: torch.Tensor, v: torch.Tensor, qk_format: str, block_n: int, stats: Optional[tuple]) -> tuple:
    """:func:`quantize_kv_reference` with its codes as fp32 values: K's (B, H, Lkp, D) and V's, not
    transposed, (B, H, Lkp, D); zeros past Lk. Then k_scale, v_scale, v_offset, k_mean as in :class:`QuantKV`."""
    B, Lk, H, D = k.shape
    nb = -(-Lk // block_n)
    lkp = nb * block_n
    k_mean, v_mean, v_inv = kv_stats(k, v) if stats is None else stats
    kc = torch.empty(B, H, lkp, D, dtype=torch.float32, device=k.device)
    torch.sub(k.float().permute(0, 2, 1, 3), k_mean[:, :, None, :], out=kc[:, :, :Lk])   # centred
    kc[:, :, Lk:] = 0.0                                           # zeros past Lk
    amax = absmax(kc, -1).clamp_min_(TINY)                        # (B, H, Lkp): per key
    qmax = QMAX[qk_format]
    k8 = round_codes_(kc.mul_((qmax / amax)[..., None]), qk_format)
    v8p = torch.empty(B, H, lkp, D, dtype=torch.float32, device=v.device)
    v8p[:, :, Lk:] = 0.0                                          # zeros past Lk
    vc = torch.sub(v.float().permute(0, 2, 1, 3), v_mean[:, :, None, :], out=v8p[:, :, :Lk])   # (B, H, Lk, D)
    vc.mul_(v_inv[:, :, None, :]).clamp_(-448.0, 448.0)
    # e4m3 codes as fp32 = vc.to(E4M3).float(): |vc| rounded (round_to_e4m3_ is symmetric), then vc's sign, so that
    # a value rounding to zero keeps its sign as the cast does (round_to_e4m3_ alone gives +0)
    mag = torch.abs(vc, out=scratch(vc.numel(), torch.float32, vc.device, "attention.v_abs").view(vc.shape))
    work = scratch(vc.numel(), torch.int32, vc.device, "attention.work").view(vc.shape)
    torch.copysign(round_to_e4m3_(mag, work, saturate=False), vc, out=vc)    # |vc| ≤ 448: no saturation
    v_scale = 1.0 / v_inv
    return k8, amax / qmax, v8p, v_scale, v_offset_reference(v8p, v_mean, v_scale, Lk, block_n), k_mean


def v_offset_reference(v8p: torch.Tensor, v_mean: torch.Tensor, v_scale: torch.Tensor, lk: int,
                       block_n: int) -> torch.Tensor:
    """What the output adds (module doc item 5): mean(V) − v_scale · Σ_L v8 / Lk, (B, H, D) fp32.

    ``v8p``: V's codes as fp32 values (B, H, Lkp, D), zero past ``lk``. Summed per key tile of ``block_n``,
    then over the tiles in order (the kernel adds the tiles' sums in groups: the same value up to fp32
    rounding; the kernel's tests compare with a tolerance)."""
    B, H, lkp, D = v8p.shape
    tiles = v8p.view(B, H, lkp // block_n, block_n, D).sum(dim=3)      # (B, H, n_tiles, D)
    total = torch.zeros_like(v_mean)
    for t in range(tiles.shape[2]):
        total = total + tiles[:, :, t]
    return v_mean - total / float(lk) * v_scale


def quantize_q_reference(q: torch.Tensor, qk_format: str = "int8") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token codes (B, H, Lq, D) fp32-valued and scales (B, H, Lq) of ``q`` (B, Lq, H, D)."""
    qf = q.float().permute(0, 2, 1, 3)
    amax = absmax(qf, -1).clamp_min_(TINY)                        # (B, H, Lq)
    qmax = QMAX[qk_format]
    return round_codes_(qf * (qmax / amax)[..., None], qk_format), amax / qmax


def _mask_4d(attn_mask: torch.Tensor, B: int, H: int, Lk: int) -> Optional[torch.Tensor]:
    """``attn_mask`` viewed as (1|B, 1|H, 1, Lk), or None if it is not a key-padding mask."""
    m = attn_mask
    if m.ndim == 2 and m.shape[0] == B and B > 1:
        m = m[:, None, None, :]                                   # (B, Lk): diffusers' 2-D form
    while m.ndim < 4:
        m = m.unsqueeze(0)
    if m.ndim != 4 or m.shape[2] != 1 or m.shape[3] != Lk or m.shape[1] not in (1, H) or m.shape[0] not in (1, B):
        return None
    return m


def is_key_padding_mask(attn_mask: Optional[torch.Tensor], B: int, H: int, Lk: int) -> bool:
    """True for None or a bool/float mask that is the same for every query (what the kernel takes)."""
    if attn_mask is None:
        return True
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        return False
    return _mask_4d(attn_mask, B, H, Lk) is not None


def key_bias(attn_mask: Optional[torch.Tensor], B: int, H: int, Lk: int) -> Optional[torch.Tensor]:
    """A key-padding mask as an additive fp32 bias (B, 1 or H, Lk) in natural-log units.

    Accepts bool (True = attend) or float (additive) masks of shape (Lk,), (B, Lk),
    (B, 1, Lk), (B, 1|H, 1, Lk) or anything broadcastable with every query dim of size 1.
    Raises ValueError for masks that vary along queries.
    """
    if attn_mask is None:
        return None
    m = _mask_4d(attn_mask, B, H, Lk)
    if m is None:
        raise ValueError(f"mask of shape {tuple(attn_mask.shape)} is not a key-padding mask for "
                         f"B={B}, H={H}, Lk={Lk}")
    if m.dtype == torch.bool:
        bias = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, float("-inf"))
    else:
        bias = m.float()
    return bias[:, :, 0, :].expand(B, bias.shape[1], Lk)


def head_strides(t: Optional[torch.Tensor]) -> Tuple[int, int]:
    """(batch, head) element strides of a (B, 1|H, …) tensor as the kernels index it: 0 along a head dim of
    size 1 (one row serves every head), (0, 0) for None."""
    if t is None:
        return 0, 0
    return t.stride(0), (t.stride(1) if t.shape[1] > 1 else 0)


def first_biased_tile(bias: torch.Tensor, block_n: int) -> torch.Tensor:
    """(B, 1|H) int32: each head's first key tile where the padded log2 key bias (B, 1|H, Lkp) is non-zero
    (a masked key, a key past Lk, any additive bias); the number of tiles where none is.

    The kernels run the tiles before it without the bias (one load and one add per score fewer). A
    HunyuanVideo step passes a key-padding mask on every attention call, but its text tokens, and so its
    masked keys, sit at the end of the joint sequence: all but the last tiles are unbiased. Adding a zero
    bias changes no score, so the result is the same either way up to the fp32 rounding of the exponent's
    argument (a fused multiply-add on the unbiased path)."""
    B, Hb, lkp = bias.shape
    n_tiles = lkp // block_n
    nz = (bias != 0).view(B, Hb, n_tiles, block_n).any(dim=-1)             # (B, Hb, n_tiles)
    idx = torch.arange(n_tiles, device=bias.device, dtype=torch.int32)
    return torch.where(nz, idx, n_tiles).amin(dim=-1).to(torch.int32)


def quant_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              attn_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                              qk_format: str = "int8", block_n: Optional[int] = None, return_lse: bool = False,
                              max_chunk: int = 1 << 24):
    """8-bit attention in plain torch: ``q`` (B, Lq, H, D), ``k``/``v`` (B, Lk, H, D).

    Returns ``out`` (B, Lq, H, D) in ``q.dtype`` and, if ``return_lse``, ``lse`` (B, Lq, H) fp32.
    ``block_n`` None: the head_dim's key tile (:func:`block_n_for`), as the kernel. Batches are
    processed in chunks of at most ``max_chunk`` score elements (memory bound).
    """
    if qk_format not in QMAX:
        raise ValueError(f"qk_format must be one of {QK_FORMATS}, got {qk_format!r}")
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    c = (scale if scale is not None else 1.0 / math.sqrt(D)) * LOG2E
    block_n = block_n or block_n_for(D)
    k8, k_scale, v8p, v_scale, v_offset, k_mean = _kv_codes(k, v, qk_format, block_n, None)
    if qk_format == "int8":
        k8.add_(0.0)                          # −0 → +0: the int8 codes' values (the kernel's; fp8 keeps −0)
    v8t = v8p.transpose(2, 3).contiguous()                        # (B, H, D, Lkp): the kernel's V layout
    q8, sq = quantize_q_reference(q, qk_format)                   # (B, H, Lq, D), (B, H, Lq)
    bias = key_bias(attn_mask, B, H, Lk)
    lkp = k8.shape[2]
    if bias is not None:                                           # (B, 1|H, Lkp) log2 units, −inf past Lk
        bias = torch.nn.functional.pad(bias * LOG2E, (0, lkp - Lk), value=float("-inf"))
    per = max(1, max_chunk // max(H * Lq * lkp, 1))
    outs, lses = [], []
    for b0 in range(0, B, per):
        sl = slice(b0, min(B, b0 + per))
        o, lse = _attend(q8[sl], sq[sl] * c, k8[sl], k_scale[sl], v8t[sl], None if bias is None else bias[sl],
                         Lk, block_n)
        outs.append(o.mul_(v_scale[sl][:, :, None, :]).add_(v_offset[sl][:, :, None, :]))
        lses.append(lse)
    out = (outs[0] if len(outs) == 1 else torch.cat(outs)).permute(0, 2, 1, 3).to(q.dtype)
    if not return_lse:
        return out
    # the scores were computed against K − mean(K): add back q·mean(K)·scale, so lse is that of the
    # true scores (ring attention merges chunks whose K means differ)
    # (an elementwise product summed over D per row: the same bits whatever the batch size, unlike a bmm)
    shift = (q.float().permute(0, 2, 1, 3) * k_mean[:, :, None, :]).sum(dim=-1) * (c / LOG2E)
    return out, (torch.cat(lses) + shift).permute(0, 2, 1).contiguous()


def _attend(q8, rowfac, k8, k_scale, v8t, bias, lk: int, block_n: int, chunk_scores: int = 1 << 20):
    """The online softmax of the kernel, vectorised over key tiles.

    The kernel visits key tiles j = 0, 1, … keeping a running max m_j (cummax of tile maxima)
    and rescales its accumulators by 2^(m_{j−1} − m_j) at each step; the product of those
    factors from tile j to the end is 2^(m_j − m_last). So 448·P of tile j is 2^(s − m_j + log2 448)
    — the values the kernel rounds to e4m3 — and enters the sums with weight 2^(m_j − m_last). The
    codes are identical to the kernel's; sums differ only in fp32 rounding order.
    Returns acc/l (B, H, Lq, D) in V-code units (P and l both in 448 units) and lse (B, H, Lq).

    Steps whose result cannot depend on how a tensor is split (the exact integer-code Q·Kᵀ, IEEE
    multiplies and subtractions, maxima, the e4m3 cast) run a few (batch, head) pairs at a time,
    about ``chunk_scores`` scores each (fewer, larger temporaries). The others run once over all heads: exp2 (its
    vectorised and scalar forms may differ in the last bit, and which elements take the scalar
    form depends on the tensor's size and threads) and the fp32 sums (l and P·V).
    """
    B, H, Lq, _ = q8.shape
    lkp = k8.shape[2]
    nb = lkp // block_n
    hb = 1 if bias is None else bias.shape[1]
    p = scratch(B * H * Lq * lkp, torch.float32, q8.device, "attention.scores").view(B, H, Lq, nb, block_n)
    m_run = torch.empty(B, H, Lq, nb, dtype=torch.float32, device=q8.device)
    chunks = _head_chunks(B, H, max(1, chunk_scores // max(Lq * lkp, 1)))
    for b, hs in chunks:
        s = torch.matmul(q8[b, hs], k8[b, hs].transpose(-1, -2), out=p[b, hs].view(-1, Lq, lkp))
        s.mul_(k_scale[b, hs, None, :]).mul_(rowfac[b, hs, :, None])     # log2 scores
        if bias is not None:
            s += bias[b, hs if hb > 1 else slice(0, 1), None, :]
        elif lk < lkp:
            s[..., lk:] = float("-inf")
        torch.cummax(p[b, hs].amax(dim=-1), dim=-1,
                     out=(m_run[b, hs], torch.empty(0, dtype=torch.long, device=p.device)))
        m_c = m_run[b, hs]
        p[b, hs].sub_((m_c.masked_fill(m_c == float("-inf"), 0.0) - LOG2_P_SCALE)[..., None])
    dead = m_run == float("-inf")                                           # no unmasked key yet
    m_use = m_run.masked_fill(dead, 0.0)
    p.exp2_()                                                               # 448·P of each tile, as the kernel has it
    w = torch.exp2(m_use - m_use[..., -1:]).masked_fill_(dead, 0.0)         # (B, H, Lq, nb)
    l = (p.sum(dim=-1) * w).sum(dim=-1)                                     # (B, H, Lq), 448 units
    work = scratch(p[chunks[0]].numel(), torch.int32, p.device, "attention.work").view(p[chunks[0]].shape)
    for b, hs in chunks:                                                    # e4m3(448 p) · weight, in place
        pc = p[b, hs]                                                       # 448 p ≤ 448: no saturation
        round_to_e4m3_(pc, work=work[:pc.shape[0]], saturate=False).mul_(w[b, hs, ..., None])
    acc = p.view(B, H, Lq, lkp) @ v8t.transpose(-1, -2)                    # (B, H, Lq, D)
    lc = l.clamp_min(L_FLOOR)
    lse = (m_run[..., -1] + torch.log2(lc) - LOG2_P_SCALE) * LN2
    return acc.div_(lc[..., None]), lse


def _head_chunks(B: int, H: int, step: int) -> list:
    """(batch index, head slice) pairs covering every (batch, head), ``step`` heads at a time."""
    return [(b, slice(h0, min(H, h0 + step))) for b in range(B) for h0 in range(0, H, step)]


__all__ = ["QuantKV", "quant_attention_reference", "quantize_kv_reference", "quantize_q_reference", "kv_stats",
           "v_offset_reference",
           "key_bias", "first_biased_tile", "head_strides", "is_key_padding_mask", "QK_FORMATS", "LOG2E", "P_SCALE", "LOG2_P_SCALE"]
