"""The Gluon attention kernel (Hopper) against the reference, the Triton kernel and SDPA.

Skipped cleanly without an sm_90 GPU or without Gluon (``pytest -m gpu`` selects them on the
device machine). Tolerances as ``test_attention_gpu.py``: kernel vs reference rel. L2 ≤ 2e-3 (same
numerics, fp32 rounding order differs — here also the order of the accumulator's rescale and add,
see attention_gluon's docstring), vs fp32 SDPA on DiT-like inputs cos ≥ 0.999, rel. L2 ≤ 2 % (int8)
/ 4 % (fp8).
"""
from __future__ import annotations

import pytest
import torch

from test_attention import metrics, qkv, sdpa


def _hopper_with_gluon() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return False
    from dvdquant.kernels.attention_triton import gluon_available
    return gluon_available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _hopper_with_gluon(), reason="needs an sm_90 GPU and Gluon")]
DEV = "cuda"


def _cuda(*ts):
    return [t.to(DEV, torch.bfloat16) for t in ts]


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("B,Lq,Lk,H,D", [(1, 4096, 4096, 4, 128), (2, 1000, 1000, 3, 64), (1, 777, 333, 2, 128),
                                          (2, 513, 129, 4, 64), (1, 300, 4000, 2, 128), (1, 64, 256, 1, 128)])
def test_gluon_vs_reference_triton_and_sdpa(fmt, B, Lq, Lk, H, D):
    """Ragged and full last key tiles, partial query tiles, both head_dims, 2 … 63 key tiles."""
    from dvdquant.kernels.attention_ref import quant_attention_reference
    from dvdquant.kernels.attention_triton import quant_attention
    q, k, v = _cuda(*qkv(B, Lq, Lk, H, D, seed=3))
    out = quant_attention(q, k, v, qk_format=fmt, impl="gluon")
    ref = quant_attention_reference(q, k, v, qk_format=fmt)
    tri = quant_attention(q, k, v, qk_format=fmt, impl="triton")
    assert metrics(out, ref)[1] <= 2e-3
    assert metrics(out, tri)[1] <= 2e-3
    cos, rel = metrics(out, sdpa(q, k, v))
    assert cos >= 0.999 and rel <= (0.02 if fmt == "int8" else 0.04), (cos, rel)


def test_gluon_lse_matches_reference():
    from dvdquant.kernels.attention_ref import quant_attention_reference
    from dvdquant.kernels.attention_triton import quant_attention
    q, k, v = _cuda(*qkv(2, 1500, 1500, 4, 128, seed=4))
    out, lse = quant_attention(q, k, v, return_lse=True, impl="gluon")
    ref, lse_ref = quant_attention_reference(q, k, v, return_lse=True)
    assert metrics(out, ref)[1] <= 2e-3 and float((lse - lse_ref).abs().max()) < 1e-2


@pytest.mark.parametrize("kind", ["bool", "additive-per-head", "all-masked-row"])
def test_gluon_key_padding_masks_and_lse(kind):
    """Key-padding masks enter as a per-key bias, as in the Triton kernel; a batch whose keys are all
    masked outputs mean(V) (the reference's convention), not NaN."""
    from dvdquant.kernels.attention_ref import quant_attention_reference
    from dvdquant.kernels.attention_triton import quant_attention
    B, L, H, D = 2, 1500, 4, 128
    q, k, v = _cuda(*qkv(B, L, L, H, D, seed=4))
    keep = torch.ones(B, L, dtype=torch.bool, device=DEV)
    keep[0, 1100:] = False
    if kind == "all-masked-row":
        keep[1, :] = False
    mask = ((~keep).float() * -10000.0)[:, None, None, :].expand(B, H, 1, L).contiguous() \
        if kind == "additive-per-head" else keep[:, None, None, :]
    out, lse = quant_attention(q, k, v, attn_mask=mask, return_lse=True, impl="gluon")
    ref, lse_ref = quant_attention_reference(q, k, v, attn_mask=mask, return_lse=True)
    tri, lse_tri = quant_attention(q, k, v, attn_mask=mask, return_lse=True, impl="triton")
    assert torch.isfinite(out).all()
    assert metrics(out, ref)[1] <= 2e-3 and metrics(out, tri)[1] <= 2e-3
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(lse)) and float((lse - lse_ref)[fin].abs().max()) < 1e-2
    if kind != "all-masked-row":
        cos, rel = metrics(out, sdpa(q, k, v, keep[:, None, None, :]))
        assert cos >= 0.999 and rel <= 0.02, (cos, rel)


def test_auto_picks_gluon_only_where_it_applies():
    from dvdquant.kernels import attention_triton as at
    q = torch.zeros(1, 512, 2, 128, device=DEV, dtype=torch.bfloat16)
    assert at.choose_impl("auto", q, 512, 128) == "gluon"
    assert at.choose_impl("auto", q, 100, 128) == "triton"
    assert at.choose_impl("triton", q, 512, 128) == "triton"
    assert at.choose_impl(None, q, 512, 128) == ("gluon" if at.DEFAULT_IMPL == "auto" else "triton")
    with pytest.raises(ValueError, match="impl='gluon'"):
        at.choose_impl("gluon", q, 100, 128)


def test_gluon_head_split_invariance():
    """Per-head results do not depend on the other heads in the call (context parallelism)."""
    from dvdquant.kernels.attention_triton import quant_attention
    B, L, H, D = 1, 5000, 8, 128
    q, k, v = _cuda(*qkv(B, L, L, H, D, seed=7))
    full = quant_attention(q, k, v, impl="gluon")
    parts = [quant_attention(*(t[:, :, h:h + H // 2] for t in (q, k, v)), impl="gluon") for h in (0, H // 2)]
    assert torch.equal(torch.cat(parts, dim=2), full)
