"""The fast CPU reference computes the same bits as before (``torch.equal``), and its weight cache.

``frozen_reference.py`` holds the previous implementations of the exact rotation, the simulated
QuantLinear forward and the 8-bit attention's online softmax; every test here runs both on the
same inputs and machine and asserts equality (for fp32 results also of the bit patterns, i.e.
the signs of zeros). The last test runs the embedded model's transformer both ways.
"""
from __future__ import annotations

import copy
import itertools

import frozen_reference as frozen
import pytest
import torch

from dvdquant.kernels import attention_ref
from dvdquant.nn import QuantLinear, RuntimeState
from dvdquant.nn import weight_cache
from dvdquant.numerics import grids
from dvdquant.numerics.hadamard import hadamard_rotate_exact
from test_kernels_emulated import make_layer

E4M3 = torch.float8_e4m3fn


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not torch.equal(a, b):
        return False
    iv = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}.get(a.dtype)
    return iv is None or torch.equal(a.contiguous().view(iv), b.contiguous().view(iv))


def wide_rows(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Rows with per-channel spread, an all-zero row, a half-zero row, tiny and huge rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g) * (torch.rand(n, generator=g) * 8 + 0.01)
    x[0] = 0
    x[1, : n // 2] = 0
    x[2] *= 1e-40
    x[3] *= 1e30
    x[4, 3] = 1e6
    return x


# sizes: one dense Sylvester matmul (256), + add/sub stages exact (512) and rounding last (1024),
# fp64 stages (2048, 4096), Paley bases with and without fp64 (12·64, 12·256, 20·256, 108·128, 140·64)
@pytest.mark.parametrize("n,block", [(256, 256), (512, 512), (1024, 1024), (2048, 2048), (4096, 4096), (48, 12),
                                     (240, 20), (768, 768), (3072, 3072), (1536, 768), (512, 64), (40, 40),
                                     (128, 1), (64, 2), (5120, 5120), (13824, 13824), (8960, 8960)])
def test_rotation_same_bits(n, block):
    x = wide_rows(9, n)
    assert same_bits(hadamard_rotate_exact(x, block), frozen.hadamard_rotate_exact(x, block))
    x3 = wide_rows(8, n, seed=1).reshape(2, 4, n).bfloat16()
    assert same_bits(hadamard_rotate_exact(x3, block), frozen.hadamard_rotate_exact(x3, block))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_fake_quant_rows_equals_codes_times_scale(bits):
    x = wide_rows(40, 96)
    x[5, 7] = -1e-3                                   # rounds to a zero code from below
    codes, scale = grids.quantize_act_per_token_int(x, bits)
    assert torch.equal(grids.fake_quant_act_rows(x, bits), codes.float() * scale)
    lam = x.abs().amax(dim=0, keepdim=True).clamp_min(1e-3)
    codes, scale = grids.quantize_act_per_token_int(x / lam, bits)
    assert torch.equal(grids.fake_quant_act_rows(x, bits, lam=lam), codes.float() * scale * lam)
    codes, scale = grids.quantize_act_per_token_fp8_e4m3(x)
    assert torch.equal(grids.fake_quant_act_rows(x, bits, "fp8"), codes.float() * scale)


def test_fake_quant_rows_scale_underflow_matches_int8_cast():
    x = torch.tensor([[0.0, 2 ** -149, 9 * 2 ** -149, -(2 ** -149)], [1.0, -2.0, 0.5, 0.0]])
    codes, scale = grids.quantize_act_per_token_int(x, 4)
    assert torch.equal(grids.fake_quant_act_rows(x, 4), codes.float() * scale)


def test_round_to_e4m3_equals_the_float8_cast():
    grid = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    grid = grid[grid.isfinite()]
    bits = grid.view(torch.int32)
    near = torch.cat([(bits + d).view(torch.float32) for d in (-1, 0, 1)])            # grid points ± 1 ulp
    mids = (grid[:-1] + grid[1:]) / 2                                                 # ties (and their neighbours)
    mids = torch.cat([(mids.view(torch.int32) + d).view(torch.float32) for d in (-1, 0, 1)])
    g = torch.Generator().manual_seed(0)
    rnd = torch.randint(0, 141 << 23, (1 << 20,), generator=g, dtype=torch.int32).view(torch.float32)
    special = torch.tensor([0.0, -0.0, 447.9, 448.0, 463.9, 464.0, 464.1, 479.9, 480.0, 500.0, 1e30, 3e38,
                            float("inf"), 2 ** -10, 2 ** -9, 3 * 2 ** -11, 2 ** -130])
    x = torch.cat([near, mids, rnd, special])
    x = torch.cat([x, -x])
    ref = x.to(E4M3).float()
    got = grids.round_to_e4m3_(x.clone())
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got[~ref.isnan()], ref[~ref.isnan()])
    assert torch.isnan(grids.round_to_e4m3_(torch.tensor([float("nan")]))).all()
    inside = x[(x.abs() <= 448.0)]                                                    # work=, saturate=False
    work = torch.empty(inside.shape, dtype=torch.int32)
    assert torch.equal(grids.round_to_e4m3_(inside.clone(), work=work, saturate=False), inside.to(E4M3).float())


def tokens(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * (torch.rand(shape[-1], generator=g) * 4 + 0.1)
    x[..., 5] *= 30.0
    x[0, 0] = 0
    return x


LAYERS = [(192, 80, auto, rot, bits, a8, wb, gs)
          for auto, rot, bits, a8, wb, gs in itertools.product(
              ["none", "per_block", "per_channel"], [None, 64, "full"], [4, 6, 8, 16], ["int", "fp8_e4m3"], [4, 8],
              [None, 64])
          if not (bits == 16 and a8 != "int") and not (wb == 8 and gs is not None)]
LAYERS += [(1024, 64, auto, "full", bits, "int", 4, None) for auto in ("none", "per_block", "per_channel")
           for bits in (4, 8)]                           # the add/sub stage that rounds last


@pytest.mark.parametrize("k,n,auto,rot,bits,a8,wb,gs", LAYERS)
def test_quant_linear_same_bits(k, n, auto, rot, bits, a8, wb, gs):
    m = make_layer(k, n, rotation_block=k if rot == "full" else rot, auto_scale=auto, a_bits=bits, a8_format=a8,
                   w_bits=wb, group_size=gs)
    x = tokens((2, 37, k))
    for _ in range(2):                                   # the second call reads the cached weight
        assert same_bits(m.forward_simulated(x), frozen.forward_simulated(m, x))
    if bits == 4:
        assert same_bits(m.forward_simulated(x.bfloat16()), frozen.forward_simulated(m, x.bfloat16()))


@pytest.mark.parametrize("extra", [dict(smooth_steps=3), dict(balance_steps=3), dict(bias=False),
                                   dict(smooth_steps=1, auto_scale="per_channel")])
def test_quant_linear_same_bits_smoothing_balance_gbs(extra):
    m = make_layer(256, 96, rotation_block=64, **extra)
    m.state = RuntimeState()
    m.state.step_index = 1
    x = tokens((2, 37, 256))
    assert same_bits(m.forward_simulated(x), frozen.forward_simulated(m, x))
    m.state.a_bits = 8                                   # a δ-GBS override
    assert same_bits(m.forward_simulated(x), frozen.forward_simulated(m, x))


@pytest.mark.parametrize("auto_scale", ["per_channel", "none"])
def test_quant_linear_same_bits_dynamic_smoothing(auto_scale):
    m = make_layer(256, 96, rotation_block=256, auto_scale=auto_scale)
    m.set_dynamic_smoothing(torch.randn(96, 256, generator=torch.Generator().manual_seed(3)) * 0.05, 0.5)
    x = tokens((2, 37, 256))
    assert same_bits(m.forward_simulated(x), frozen.forward_simulated(m, x))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("B,Lq,Lk,H,D,mask", [(2, 130, 130, 2, 64, False), (2, 130, 130, 2, 64, True),
                                              (1, 77, 300, 3, 128, True), (2, 200, 200, 3, 64, False),
                                              (3, 64, 64, 4, 64, False)])
def test_attention_same_bits(fmt, B, Lq, Lk, H, D, mask, monkeypatch):
    g = torch.Generator().manual_seed(Lq + Lk)
    q = torch.randn(B, Lq, H, D, generator=g) * 2
    k = torch.randn(B, Lk, H, D, generator=g) * 3 + 1
    v = torch.randn(B, Lk, H, D, generator=g)
    am = None
    if mask:
        am = torch.ones(B, Lk, dtype=torch.bool)
        am[:, -17:] = False
        am[0, :] = False                                  # a fully masked row
    for chunk in (1 << 20, 1 << 12):                       # one head per chunk, and several
        new = attention_ref.quant_attention_reference(q, k, v, attn_mask=am, qk_format=fmt, return_lse=True)
        with monkeypatch.context() as mp:
            mp.setattr(attention_ref, "_attend", frozen.attend)
            old = attention_ref.quant_attention_reference(q, k, v, attn_mask=am, qk_format=fmt, return_lse=True)
        assert same_bits(new[0], old[0]) and same_bits(new[1], old[1])
        monkeypatch.setattr(attention_ref._attend, "__defaults__", (chunk,))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("B,Lq,Lk,H,D,mask", [(2, 130, 130, 2, 64, False), (2, 130, 130, 2, 64, True),
                                              (1, 77, 300, 3, 128, True), (3, 64, 64, 4, 64, False),
                                              (2, 100, 100, 2, 32, True)])
def test_attention_codes_and_whole_reference_same_bits(fmt, B, Lq, Lk, H, D, mask):
    """K/V/Q quantization (fp32 codes, in-place rounding, e4m3 without the cast) and the whole reference, against
    the previous implementation end to end, with −0, tiny values and constant channels in the inputs."""
    g = torch.Generator().manual_seed(Lq + 7 * Lk)
    q = torch.randn(B, Lq, H, D, generator=g) * 2
    k = torch.randn(B, Lk, H, D, generator=g) * 3 + 1
    v = torch.randn(B, Lk, H, D, generator=g)
    q[0, 0, 0] = 0.0
    q[0, 1, 0] = -0.0
    k[0, :, 0, 1] = 5.0                                            # a constant K channel: centred to exact zeros
    v[0, :, 0, 2] = -0.0
    v[0, 3:9, 0, 3] = -1e-9                                        # values that round to −0 in e4m3
    am = None
    if mask:
        am = torch.ones(B, Lk, dtype=torch.bool)
        am[:, -17:] = False
        am[0, :] = False
    bn = attention_ref.block_n_for(D)
    new_kv = attention_ref.quantize_kv_reference(k, v, fmt, bn)
    old_kv = frozen.quantize_kv(k, v, fmt, bn)
    for name, old in zip(("k8", "k_scale", "v8t", "v_scale", "v_offset", "k_mean"), old_kv):
        new = getattr(new_kv, name)
        assert new.dtype == old.dtype and torch.equal(new.view(torch.uint8) if new.element_size() == 1 else new,
                                                      old.view(torch.uint8) if old.element_size() == 1 else old), name
    for dtype in (torch.float32, torch.bfloat16):
        new = attention_ref.quant_attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=am,
                                                      qk_format=fmt, return_lse=True)
        old = frozen.quant_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=am, qk_format=fmt)
        assert same_bits(new[0], old[0]) and same_bits(new[1], old[1])


def test_absmax_equals_abs_amax():
    from dvdquant.numerics.reduce import absmax
    x = wide_rows(40, 96).reshape(8, 5, 96)
    x[0, 0, :4] = torch.tensor([-0.0, float("inf"), -float("inf"), -3.0])
    x[1] = -0.0
    x[2, 1, 7] = float("nan")
    for dim, keepdim in [(-1, True), (1, False), (0, False), ((1, 2), True)]:
        want, got = x.abs().amax(dim=dim, keepdim=keepdim), absmax(x, dim, keepdim)
        nan = want.isnan()
        assert torch.equal(nan, got.isnan())
        assert torch.equal(want[~nan].view(torch.int32), got[~nan].view(torch.int32))   # +0, not −0


def test_scratch_buffers_are_reused_per_slot():
    from dvdquant.numerics.scratch import scratch
    a = scratch(100, torch.float32, "cpu", "test.a")
    assert scratch(60, torch.float32, "cpu", "test.a").data_ptr() == a.data_ptr()         # reused, shorter view
    assert scratch(60, torch.float32, "cpu", "test.b").data_ptr() != a.data_ptr()         # another slot
    assert scratch(60, torch.int32, "cpu", "test.a").data_ptr() != a.data_ptr()           # another dtype
    assert scratch(200, torch.float32, "cpu", "test.a").numel() == 200                     # grown


@pytest.mark.parametrize("block", [16, 32, 64, 128, 256, 512, 1024])
def test_rotation_fast_path_equals_the_staged_sum(block):
    """hadamard_rotate_exact's Sylvester path (scratch buffers, out=) against exact_pm1_rotation_sum of the snap."""
    from dvdquant.numerics.hadamard import exact_pm1_rotation_sum, inv_sqrt_r, snap_to_rotation_grid
    x = wide_rows(12, 2 * block).reshape(3, 4, 2 * block)
    want = exact_pm1_rotation_sum(snap_to_rotation_grid(x, block), block) * inv_sqrt_r(block)
    assert same_bits(hadamard_rotate_exact(x, block), want)
    out = torch.empty(x.numel())
    got = hadamard_rotate_exact(x[:, :, :], block, out=out)
    assert same_bits(got, want) and got.data_ptr() == out.data_ptr()
    assert same_bits(hadamard_rotate_exact(x.transpose(0, 1), block), want.transpose(0, 1))   # strided input


# ----------------------------------------------------------------------------- the decoded-weight cache
def test_weight_cache_follows_the_weight_and_is_never_saved(tmp_path):
    m = make_layer(64, 32, rotation_block=64, auto_scale="per_channel")
    x = tokens((1, 9, 64))
    y0 = m.forward_simulated(x)
    assert not any("decoded" in k for k in m.state_dict())
    assert m._decoded._entries                                        # cached after one call
    other = make_layer(64, 32, rotation_block=64, auto_scale="per_channel", seed=5)
    m.load_state_dict(other.state_dict())                             # in-place copies: versions move
    assert torch.equal(m.forward_simulated(x), other.forward_simulated(x))
    m.w_scale.mul_(2.0)
    assert torch.equal(m.forward_simulated(x), frozen.forward_simulated(m, x))
    m.qweight = other.qweight.clone()                                  # a replaced buffer
    assert torch.equal(m.forward_simulated(x), frozen.forward_simulated(m, x))
    assert not copy.deepcopy(m)._decoded._entries                      # copies start empty
    torch.save(m, tmp_path / "m.pt")
    assert not torch.load(tmp_path / "m.pt", weights_only=False)._decoded._entries
    assert not torch.equal(y0, m.forward_simulated(x))


def test_weight_cache_budget_and_inference_tensors(monkeypatch):
    monkeypatch.setattr(weight_cache, "BUDGET_BYTES", 0)
    m = make_layer(64, 32, rotation_block=64, auto_scale="per_channel")
    x = tokens((1, 9, 64))
    assert torch.equal(m.forward_simulated(x), frozen.forward_simulated(m, x))
    assert not m._decoded._entries                                    # over budget: decoded per call
    monkeypatch.setattr(weight_cache, "BUDGET_BYTES", 1 << 30)
    with torch.inference_mode():
        mi = make_layer(64, 32, rotation_block=64, auto_scale="per_channel")
        assert torch.equal(mi.forward_simulated(x), frozen.forward_simulated(mi, x))
    assert not mi._decoded._entries                                   # no version counter: never cached


# ----------------------------------------------------------------------------- the embedded model
@pytest.fixture(scope="module")
def embedded():
    from dvdquant.models.embedded import load_embedded
    return load_embedded()


@pytest.mark.slow
@pytest.mark.parametrize("a_bits,auto,attention", [(4, "per_channel", "int8"), (8, "per_channel", "int8"),
                                                   (4, "per_block", "int8"), (8, "per_block", "fp8")])
def test_embedded_transformer_same_bits(embedded, a_bits, auto, attention, monkeypatch):
    from dvdquant import api
    from dvdquant.config import DVDQuantConfig
    t = copy.deepcopy(embedded.transformer)
    api.quantize_(t, DVDQuantConfig(w_bits=4, a_bits=a_bits, auto_scale=auto, attention=attention), progress=False)
    g = torch.Generator().manual_seed(0)
    cfg = t.config
    inputs = dict(hidden_states=torch.randn(2, cfg.in_channels, 4, 32, 32, generator=g),
                  timestep=torch.tensor([700.0, 300.0]),
                  encoder_hidden_states=torch.randn(2, 12, cfg.text_dim, generator=g), return_dict=False)
    with torch.no_grad():
        new = t(**inputs)[0]
        monkeypatch.setattr(QuantLinear, "forward_simulated", frozen.forward_simulated)
        monkeypatch.setattr(attention_ref, "_attend", frozen.attend)
        old = t(**inputs)[0]
    assert same_bits(new, old)
