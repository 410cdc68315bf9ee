"""8-bit attention: reference vs SDPA, Triton (interpreter) vs reference, path selection and
fallbacks, the diffusers backend/installer, and the config/quantize_/load hooks. CPU only.

GPU checks (kernel vs SDPA at real sizes, captured inputs) are in ``tests/test_attention_gpu.py``.
"""
from __future__ import annotations

import math
import logging
import os

import pytest
import torch
from interpreter import checks_fixture, main

from dvdquant.kernels.attention_ref import (key_bias, quant_attention_reference, quantize_kv_reference)
from dvdquant.nn.attention import (backend_value, install_quantized_attention, plan_attention,
                                   quantized_attention_mode, register_backends, remove_quantized_attention)



def sdpa(q, k, v, mask=None):
    """fp32 SDPA in dispatch layout (B, L, H, D); bool masks True = attend."""
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                                         v.transpose(1, 2).float(), attn_mask=mask)
    return o.transpose(1, 2)


def qkv(B, Lq, Lk, H, D, seed=0):
    """Inputs shaped like a DiT's: K with a shared offset (what smoothing removes), V with a channel mean."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, D, generator=g) * 1.5
    k = torch.randn(B, Lk, H, D, generator=g) * 1.5 + torch.randn(1, 1, H, D, generator=g) * 4
    v = torch.randn(B, Lk, H, D, generator=g) + torch.randn(1, 1, H, D, generator=g)
    return q, k, v


def metrics(o, r):
    o, r = o.float().flatten(), r.float().flatten()
    return float(torch.nn.functional.cosine_similarity(o, r, dim=0)), float((o - r).norm() / r.norm())


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("B,Lq,Lk,H,D", [(2, 77, 77, 2, 64), (1, 130, 45, 3, 128), (2, 64, 13, 2, 64)])
def test_reference_close_to_sdpa(fmt, B, Lq, Lk, H, D):
    q, k, v = qkv(B, Lq, Lk, H, D)
    cos, rel = metrics(quant_attention_reference(q, k, v, qk_format=fmt), sdpa(q, k, v))
    # random inputs with sharp scores; e4m3 Q·Kᵀ (3 mantissa bits) is the coarser format
    assert cos >= 0.999 and rel <= (0.02 if fmt == "int8" else 0.04), (cos, rel)


@pytest.mark.parametrize("kind", ["bool", "additive-per-head", "2d"])
def test_reference_key_padding_masks(kind):
    B, L, H, D = 2, 70, 2, 64
    q, k, v = qkv(B, L, L, H, D, seed=1)
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[0, 50:] = False
    if kind == "bool":
        mask = keep[:, None, None, :]
    elif kind == "additive-per-head":
        mask = ((~keep).float() * -10000.0)[:, None, None, :].expand(B, H, 1, L).contiguous()
    else:
        mask = keep
    ref = sdpa(q, k, v, keep[:, None, None, :])
    cos, rel = metrics(quant_attention_reference(q, k, v, attn_mask=mask), ref)
    assert cos >= 0.999 and rel <= 0.02, (cos, rel)
    assert key_bias(mask, B, H, L).shape[-1] == L


def test_first_biased_tile_finds_the_masked_tail():
    """The kernels run key tiles before the first non-zero bias unbiased: that index per (batch, head)."""
    from dvdquant.kernels.attention_ref import first_biased_tile
    B, lkp, bn = 2, 8 * 16, 16
    bias = torch.zeros(B, 1, lkp)
    bias[0, :, 100:] = float("-inf")                              # keys past Lk = 100 (ragged tile 6)
    assert first_biased_tile(bias, bn).tolist() == [[6], [8]]     # batch 1: nothing biased → n_tiles
    per_head = torch.zeros(1, 3, lkp)
    per_head[0, 1, 17] = -10000.0                                 # an additive bias inside tile 1
    per_head[0, 2, 0] = 0.5
    assert first_biased_tile(per_head, bn).tolist() == [[8, 1, 0]]
    assert first_biased_tile(per_head, bn).dtype == torch.int32


def test_k_smoothing_is_free():
    """Adding one vector to every key moves each score row by a constant: SDPA and the quantized
    attention (which subtracts mean(K) first) are unchanged up to fp32 rounding (which can flip a rare
    8-bit code: ~1e-3 for some shifts, 8e-7 for this seeded one)."""
    q, k, v = qkv(1, 64, 64, 2, 64, seed=2)
    shift = torch.randn(1, 1, 2, 64, generator=torch.Generator().manual_seed(7)) * 50   # seeded: no test-order effects
    a = quant_attention_reference(q, k, v)
    b = quant_attention_reference(q, k + shift, v)
    assert metrics(a, b)[1] < 1e-3
    assert metrics(sdpa(q, k, v), sdpa(q, k + shift, v))[1] < 1e-4


def test_reference_lse_and_fully_masked_rows():
    q, k, v = qkv(1, 20, 30, 1, 64, seed=3)
    out, lse = quant_attention_reference(q, k, v, return_lse=True)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8.0
    assert torch.allclose(lse, torch.logsumexp(s, -1).permute(0, 2, 1), atol=0.05)
    dead = torch.zeros(1, 1, 1, 30, dtype=torch.bool)
    out = quant_attention_reference(q, k, v, attn_mask=dead)
    assert torch.isfinite(out).all()
    kv = quantize_kv_reference(k, v, "int8", 64)
    assert kv.k8.shape == (1, 1, 64, 64) and (kv.k8[:, :, 30:] == 0).all()



def test_reference_flat_attention_v_offset_removes_the_codes_mean_error():
    """Flat attention (issue #23): q, k, v ~ N(0, 1) in bf16, every row averages thousands of V rows, so
    the mean rounding error of V's codes is a bias of the output; v_offset (attention_ref item 5) removes it.
    At 8k keys: 4.1 % rel. L2 with the old offset mean(V), 3.5 % with v_offset (P's and V's e4m3 rounding)."""
    from dvdquant.kernels.attention_ref import kv_stats
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8192, 2, 128, generator=g).bfloat16() for _ in range(3))
    q = q[:, :64]
    out = quant_attention_reference(q, k, v).float()
    old = out + (kv_stats(k, v)[1] - quantize_kv_reference(k, v, "int8", 128).v_offset)[:, None]
    exact = sdpa(q, k, v)
    rel, rel_old = metrics(out, exact)[1], metrics(old, exact)[1]
    assert rel < 0.037 and rel < 0.9 * rel_old, (rel, rel_old)


# ----------------------------------------------------------------------------- Triton interpreter
def _stats_checks(kv_stats_triton) -> dict:
    """Fixed-order K/V statistics: ≈ torch's, and bit-identical for a head whatever the other heads and
    the layout (the context-parallel invariance: Ulysses hands each rank a subset of heads)."""
    from dvdquant.kernels import attention_triton
    from dvdquant.kernels.attention_ref import kv_stats
    res = {}
    old = attention_triton.STATS_CHUNK
    attention_triton.STATS_CHUNK = 128                            # several chunks on a tiny shape
    try:
        for Lk in (300, 5):
            _, k, v = qkv(2, 4, Lk, 4, 64, seed=3)
            k = k * 3.0 + 0.5                                     # an offset for the means to find
            got = kv_stats_triton(k, v)
            close = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, kv_stats(k, v)))
            halves = [kv_stats_triton(k[:, :, h:h + 2].contiguous(), v[:, :, h:h + 2].contiguous()) for h in (0, 2)]
            split = all(torch.equal(torch.cat([a[:, :2], b[:, :2]], 1), g) for a, b, g in zip(*halves, got))
            kt = k.transpose(1, 2).contiguous().transpose(1, 2)   # (B, Lk, H, D) view of a (B, H, Lk, D) tensor
            vt = v.transpose(1, 2).contiguous().transpose(1, 2)
            layout = all(torch.equal(a, b) for a, b in zip(kv_stats_triton(kt, vt), got))
            res[f"stats-Lk{Lk}"] = [bool(close and split and layout), f"close={close} split={split} layout={layout}"]
    finally:
        attention_triton.STATS_CHUNK = old
    return res


def _interpreter_checks() -> dict:
    from dvdquant.kernels.attention_triton import kv_stats_triton, quant_attention, quantize_kv
    res = _stats_checks(kv_stats_triton)
    cases = [(1, 70, 45, 2, 64, None), (2, 33, 100, 2, 128, "bool"), (1, 64, 64, 1, 64, "additive"),
             (1, 40, 9, 2, 64, None), (1, 40, 64, 2, 64, "all-true")]
    for i, (B, Lq, Lk, H, D, mk) in enumerate(cases):
        q, k, v = qkv(B, Lq, Lk, H, D, seed=10 + i)
        mask = None
        if mk == "bool":
            mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
            mask[0, ..., 60:] = False
        elif mk == "additive":
            mask = torch.zeros(B, H, 1, Lk)
            mask[..., 50:] = -10000.0
        elif mk == "all-true":                                    # a mask with nothing masked: no biased tile
            mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        for fmt in ("int8", "fp8"):
            a = quantize_kv(k, v, fmt, 32)
            r = quantize_kv_reference(k, v, fmt, 32, stats=kv_stats_triton(k, v))
            codes = torch.equal(a.k8.view(torch.uint8), r.k8.view(torch.uint8)) and \
                torch.equal(a.v8t.view(torch.uint8), r.v8t.view(torch.uint8)) and \
                torch.allclose(a.v_offset, r.v_offset, rtol=1e-6, atol=1e-7)   # V codes' sums: fp32 order
            o, lse = quant_attention(q, k, v, attn_mask=mask, qk_format=fmt, block_n=32, block_m=32, return_lse=True)
            o2, lse2 = quant_attention_reference(q, k, v, attn_mask=mask, qk_format=fmt, block_n=32, return_lse=True)
            rel = float((o - o2).norm() / o2.norm())
            dl = float((lse - lse2).abs().max())
            # K/V tiles through tensor descriptors: the same tiles, so the same output bit for bit
            ot, lset = quant_attention(q, k, v, attn_mask=mask, qk_format=fmt, block_n=32, block_m=32,
                                       return_lse=True, use_tma=True)
            tma = torch.equal(ot, o) and torch.equal(lset, lse)
            tail = 0.0                      # the bias on every tile instead of from the first biased one
            if mask is not None:
                ob = quant_attention(q, k, v, attn_mask=mask, qk_format=fmt, block_n=32, block_m=32, bias_tail=False)
                tail = float((ob - o).norm() / o.norm())
            res[f"{B}x{Lq}x{Lk}x{H}x{D}-{mk}-{fmt}"] = [
                bool(codes and rel < 1e-4 and dl < 1e-4 and tma and tail < 1e-4),
                f"codes={codes} rel={rel:.1e} lse={dl:.1e} tma_same={tma} bias_everywhere={tail:.1e}"]
    # per (batch, head) statistics: a batch element's output and lse do not depend on the others
    q, k, v = qkv(3, 40, 100, 2, 64, seed=30)
    k = k + torch.arange(3.0).view(3, 1, 1, 1) * 2.0              # a different K offset per sample
    for fmt in ("int8", "fp8"):
        o, lse = quant_attention(q, k, v, qk_format=fmt, block_n=32, block_m=32, return_lse=True)
        o1, lse1 = quant_attention(q[1:2], k[1:2], v[1:2], qk_format=fmt, block_n=32, block_m=32, return_lse=True)
        res[f"batch-independent-{fmt}"] = [torch.equal(o[1:2], o1) and torch.equal(lse[1:2], lse1), ""]
    for D in (64, 128):              # the default launch config of each head_dim, reference tiled alike
        q, k, v = qkv(1, 130, 150, 1, D, seed=20 + D)
        o, o2 = quant_attention(q, k, v), quant_attention_reference(q, k, v)
        rel = float((o - o2).norm() / o2.norm())
        res[f"default-tiles-D{D}"] = [rel < 1e-4, f"rel={rel:.1e}"]
    return res


interp = checks_fixture(__file__)


def test_triton_kernel_matches_reference_in_interpreter(interp):
    bad = {k: v for k, v in interp.items() if not v[0]}
    assert len(interp) == 16 and not bad, bad


def test_sdpa_with_lse_matches_sdpa_and_logsumexp():
    """The ring-attention fallback: exact attention and its lse, chunked over queries, masks, causal."""
    from dvdquant.nn.attention import sdpa_with_lse
    q, k, v = qkv(2, 37, 29, 3, 32, seed=21)
    keep = torch.ones(2, 1, 1, 29, dtype=torch.bool)
    keep[1, ..., 20:] = False
    for mask, causal in ((None, False), (keep, False), (None, True)):
        out, lse = sdpa_with_lse(q, k, v, attn_mask=mask, is_causal=causal, max_chunk=3 * 29 * 5)
        o1, l1 = sdpa_with_lse(q[1:], k[1:], v[1:], attn_mask=None if mask is None else mask[1:],
                               is_causal=causal, max_chunk=3 * 29 * 5)
        assert torch.equal(out[1:], o1) and torch.equal(lse[1:], l1)        # per batch element
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal)
        s = qt @ kt.transpose(-1, -2) / math.sqrt(32)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        if causal:
            s = s.masked_fill(torch.ones(37, 29, dtype=torch.bool).triu(1), float("-inf"))
        assert torch.allclose(out, ref.transpose(1, 2), atol=1e-5)
        assert torch.allclose(lse, torch.logsumexp(s, -1).transpose(1, 2), atol=1e-5)


# ----------------------------------------------------------------------------- path selection
def test_plan_selection_and_fallbacks():
    q, k, v = qkv(1, 8, 8, 2, 64)
    assert plan_attention(q, k, v).path == "emulated"                        # CPU, auto
    long_k = torch.randn(1, 300, 2, 64)
    assert plan_attention(q, long_k, long_k).path == "emulated"              # long cross-attention
    assert plan_attention(q, k, v, capability=(9, 0)).path == "triton"
    assert plan_attention(q, k, v, path="emulated", capability=(9, 0)).path == "emulated"
    odd = torch.randn(1, 8, 2, 80)
    cases = {
        "head_dim 80": plan_attention(odd, odd, odd),
        "causal": plan_attention(q, k, v, is_causal=True),
        "dropout": plan_attention(q, k, v, dropout_p=0.1),
        "grouped-query": plan_attention(q, k[:, :, :1], v[:, :, :1]),
        "varies along queries": plan_attention(q, k, v, attn_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool)),
        "dtype": plan_attention(q.double(), k.double(), v.double()),
        "cross-attention": plan_attention(q, k[:, :5], v[:, :5]),
    }
    for word, plan in cases.items():
        assert plan.path == "sdpa" and word in plan.reason, (word, plan)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert plan_attention(q, k, v, path="triton").path == "sdpa"


# ----------------------------------------------------------------------------- diffusers integration
def _tiny(name):
    from diffusers import CogVideoXTransformer3DModel, LTXVideoTransformer3DModel

    from tiny_models import tiny_hunyuan, tiny_wan
    g = torch.Generator().manual_seed(7)
    if name == "wan":
        return tiny_wan(head_dim=64)
    if name == "hunyuan":
        m, inp = tiny_hunyuan(head_dim=64)
        inp["encoder_attention_mask"][:, 5:] = 0                                  # real key padding
        return m, inp
    if name == "cogvideox":
        m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
                                        time_embed_dim=16, text_embed_dim=32, num_layers=1, sample_width=8,
                                        sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                        max_text_seq_length=8)
        return m, dict(hidden_states=torch.randn(1, 3, 4, 8, 8, generator=g), timestep=torch.tensor([500]),
                       encoder_hidden_states=torch.randn(1, 8, 32, generator=g))
    m = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
                                   attention_head_dim=64, cross_attention_dim=128, num_layers=1, caption_channels=32)
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[:, 6:] = 0
    return m, dict(hidden_states=torch.randn(1, 32, 4, generator=g), timestep=torch.tensor([500]),
                   encoder_hidden_states=torch.randn(1, 8, 32, generator=g), encoder_attention_mask=mask,
                   num_frames=2, height=4, width=4)


@pytest.mark.parametrize("name", ["wan", "hunyuan", "cogvideox", "ltx"])
def test_installed_models_run_close_to_fp(name):
    from tiny_models import run
    m, inp = _tiny(name)
    m.eval()
    ref = run(m, inp)
    counts = install_quantized_attention(m)
    assert counts["dispatch"] + counts["replaced"] > 0 and quantized_attention_mode(m) == "int8"
    out = run(m, inp)
    cos, rel = metrics(out, ref)
    assert 0 < rel < 0.02 and cos > 0.999, (cos, rel)
    assert remove_quantized_attention(m) == counts["dispatch"] + counts["replaced"]
    assert torch.equal(run(m, inp), ref) and quantized_attention_mode(m) is None


def test_cogvideox_processor_replica_is_exact_on_sdpa():
    """The replacement processor does CogVideoX's math: with the native backend it equals the original."""
    from tiny_models import run

    from dvdquant.nn.attention import CogVideoXQuantAttnProcessor
    m, inp = _tiny("cogvideox")
    ref = run(m, inp)
    for mod in m.modules():
        if type(getattr(mod, "processor", None)).__name__ == "CogVideoXAttnProcessor2_0":
            mod.processor = CogVideoXQuantAttnProcessor()
    assert torch.allclose(run(m, inp), ref, atol=1e-5)


def test_fallback_logs_once_and_equals_sdpa(caplog):
    from tiny_models import run, tiny_wan
    m, inp = tiny_wan(head_dim=32)
    ref = run(m, inp)
    install_quantized_attention(m)
    with caplog.at_level(logging.INFO, logger="dvdquant.nn.attention"):
        out = run(m, inp)
        run(m, inp)
    assert torch.equal(out, ref)
    assert sum("head_dim 32" in r.getMessage() for r in caplog.records) <= 1


def test_backend_registered_with_context_parallel_support():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    members = register_backends()
    assert register_backends() == members                                        # idempotent
    for value in ("dvdquant_int8", "dvdquant_fp8", "dvdquant_int8_emulated", "dvdquant_fp8_triton"):
        member = AttentionBackendName(value)
        assert member in _AttentionBackendRegistry._backends
        assert _AttentionBackendRegistry._is_context_parallel_available(member)
    assert AttentionBackendName("native") is AttentionBackendName.NATIVE                   # nothing replaced
    from tiny_models import run, tiny_wan
    m, inp = tiny_wan(head_dim=64)
    ref = run(m, inp)
    m.set_attention_backend(backend_value("int8", "emulated"))                          # diffusers' own API
    assert 0 < metrics(run(m, inp), ref)[1] < 0.02
    m.reset_attention_backend()


def test_config_quantize_and_load_hooks(tmp_path):
    import dvdquant
    from dvdquant.config import DVDQuantConfig, MinMaxConfig
    from dvdquant.errors import ConfigError
    from tiny_models import run, tiny_wan
    assert DVDQuantConfig().attention == "int8"
    with pytest.raises(ConfigError, match="attention"):
        DVDQuantConfig(attention="int4")
    with pytest.raises(ConfigError):
        install_quantized_attention(tiny_wan()[0], mode="int4")
    m, inp = tiny_wan(head_dim=64)
    dvdquant.quantize_(m, DVDQuantConfig(w_bits=4, a_bits=8, bgr=None))
    assert quantized_attention_mode(m) == "int8"
    out = run(m, inp)
    path = dvdquant.save(m, tmp_path / "m.safetensors")
    loaded = dvdquant.load(path)
    assert quantized_attention_mode(loaded) == "int8" and torch.allclose(run(loaded, inp), out, atol=1e-5)
    m2, _ = tiny_wan(head_dim=64)
    dvdquant.quantize_(m2, DVDQuantConfig(w_bits=4, a_bits=8, bgr=None, attention="none"))
    assert quantized_attention_mode(m2) is None
    m3, _ = tiny_wan(head_dim=64)
    dvdquant.quantize_(m3, MinMaxConfig(w_bits=4, a_bits=8))
    assert quantized_attention_mode(m3) is None


if __name__ == "__main__":
    main(_interpreter_checks)


def test_tma_default_only_on_sm90_gpus_at_head_dim_128(monkeypatch):
    """TMA K/V loads are the default only where they measured faster (sm90+, head_dim 128), never on
    the CPU, in Triton's interpreter or on sm89 (no tensor-memory accelerator)."""
    at = pytest.importorskip("dvdquant.kernels.attention_triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cuda = torch.device("cuda")
    assert not at.default_use_tma(torch.device("cpu"), 128)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert at.default_use_tma(cuda, 128) and not at.default_use_tma(cuda, 64)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert not at.default_use_tma(cuda, 128)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not at.default_use_tma(cuda, 128)


def test_set_backend_moves_installed_attention_to_its_path():
    """The execution config's ``attention_path`` re-installs the model's 8-bit attention on that path (same
    mode); on a CPU "auto" is the emulated reference, so the output does not change."""
    import dvdquant
    from dvdquant.nn.attention import quantized_attention_path
    from tiny_models import run, tiny_wan
    m, inp = tiny_wan(head_dim=64)
    dvdquant.quantize_(m, dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, rotation_block=32))    # attention="int8"
    assert (quantized_attention_mode(m), quantized_attention_path(m)) == ("int8", "auto")
    ref = run(m, inp)
    dvdquant.set_backend(m, "simulated", attention_path="emulated")
    assert (quantized_attention_mode(m), quantized_attention_path(m)) == ("int8", "emulated")
    assert m.blocks[0].attn1.processor._attention_backend.value == backend_value("int8", "emulated")
    assert torch.equal(run(m, inp), ref)
    dvdquant.set_backend(m, "simulated")
    assert m.blocks[0].attn1.processor._attention_backend.value == backend_value("int8", "auto")
