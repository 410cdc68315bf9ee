"""Fused sibling projections (dvdquant.nn.fused): installation, fallbacks, equality (CPU).

The fp8 path's fused op itself is checked against the members' own fp8 forwards in
test_kernels_triton.py (interpreter) and on the GPU in test_kernels_gpu.py.
"""
from __future__ import annotations

import logging

import pytest
import torch

import dvdquant
from dvdquant.nn.fused import FusedProjection, fused_modules

pytest.importorskip("diffusers")
from tiny_models import tiny_hunyuan, tiny_wan  # noqa: E402


def _quantized_wan():
    m, inputs = tiny_wan()
    dvdquant.quantize_(m, dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, rotation_block=32, attention="none"))
    return m.eval(), inputs


def test_set_backend_fuses_wan_qkv_and_kv_with_equal_outputs():
    m, inputs = _quantized_wan()
    keys = set(m.state_dict())
    with torch.no_grad():
        dvdquant.set_backend(m, "emulated", fuse_projections=False)
        assert fused_modules(m) == []
        ref = m(**inputs, return_dict=False)[0]
        dvdquant.set_backend(m, "emulated")
        fused = dict(fused_modules(m))
        assert fused == {f"blocks.{i}.{a}": (("to_qkv",) if a == "attn1" else ("to_kv",))
                         for i in range(2) for a in ("attn1", "attn2")}
        attn1 = m.blocks[0].attn1
        assert attn1.fused_projections and isinstance(attn1.to_qkv, FusedProjection)
        assert attn1.to_qkv.members == [attn1.to_q, attn1.to_k, attn1.to_v]
        assert set(m.state_dict()) == keys                      # not submodules: checkpoints unchanged
        assert torch.equal(m(**inputs, return_dict=False)[0], ref)
        dvdquant.set_backend(m, "simulated")                    # the reference path: unfused again
        assert fused_modules(m) == [] and not attn1.fused_projections and not hasattr(attn1, "to_qkv")


def test_fused_projection_calls_members_off_the_fp8_path():
    m, _ = _quantized_wan()
    dvdquant.set_backend(m, "emulated")
    attn = m.blocks[0].attn1
    x = torch.randn(2, 5, attn.to_q.in_features)
    with torch.no_grad():
        assert torch.equal(attn.to_qkv(x), torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], -1))
        attn.to_k.a_bits = 8                                     # a member changed after installation
        assert torch.equal(attn.to_qkv(x), torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], -1))


def test_incompatible_members_stay_unfused(caplog):
    m, inputs = _quantized_wan()
    m.blocks[1].attn1.to_k.a_bits = 8                           # e.g. a per-layer override
    with caplog.at_level(logging.INFO, logger="dvdquant.nn.fused"):
        dvdquant.set_backend(m, "emulated")
    names = dict(fused_modules(m))
    assert "blocks.1.attn1" not in names and "blocks.0.attn1" in names and "blocks.1.attn2" in names
    assert "members differ in a_bits" in caplog.text
    assert not m.blocks[1].attn1.fused_projections


def test_models_without_fusable_processors_are_untouched():
    from tiny_models import tiny_cogvideox
    m, _ = tiny_cogvideox()
    dvdquant.quantize_(m, dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, rotation_block=32, attention="none"))
    dvdquant.set_backend(m, "emulated")
    assert fused_modules(m) == []


def test_hunyuan_fuses_qkv_through_its_fused_aware_processor():
    """HunyuanVideo's processor has no fused form: while the fusion is installed it runs as dvdquant's
    subclass (same instance and state), with the same outputs bit for bit; removal restores the class."""
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    from dvdquant.nn.processors import HunyuanVideoFusedAttnProcessor
    m, inputs = tiny_hunyuan(layers=2, single_layers=2)
    dvdquant.quantize_(m, dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, rotation_block=32, attention="none"))
    m.eval()
    proc = m.transformer_blocks[0].attn.processor
    proc._attention_backend = "native"                           # instance state the switch must keep
    with torch.no_grad():
        dvdquant.set_backend(m, "emulated", fuse_projections=False)
        ref = m(**inputs, return_dict=False)[0]
        dvdquant.set_backend(m, "emulated")
        fused = dict(fused_modules(m))
        assert fused == {**{f"transformer_blocks.{i}.attn": ("to_qkv", "to_added_qkv") for i in range(2)},
                         **{f"single_transformer_blocks.{i}.attn": ("to_qkv",) for i in range(2)}}
        assert m.transformer_blocks[0].attn.processor is proc and type(proc) is HunyuanVideoFusedAttnProcessor
        assert proc._attention_backend == "native"
        assert not any("token_refiner" in n for n in fused)      # kept in high precision: nothing to fuse
        assert torch.equal(m(**inputs, return_dict=False)[0], ref)
        dvdquant.set_backend(m, "emulated", fuse_projections=False)
        assert type(proc) is HunyuanVideoAttnProcessor2_0 and proc._attention_backend == "native"
        assert not hasattr(m.single_transformer_blocks[0].attn, "to_qkv")


def test_hunyuan_fused_aware_processor_equals_diffusers_on_sdpa():
    """Unfused, the subclass computes exactly what diffusers' processor computes (both block kinds)."""
    m, inputs = tiny_hunyuan(layers=1, single_layers=1)
    m.eval()
    with torch.no_grad():
        ref = m(**inputs, return_dict=False)[0]
        from dvdquant.nn.processors import HunyuanVideoFusedAttnProcessor
        for blk in list(m.transformer_blocks) + list(m.single_transformer_blocks):
            blk.attn.processor.__class__ = HunyuanVideoFusedAttnProcessor
        assert torch.equal(m(**inputs, return_dict=False)[0], ref)


def test_checkpoint_of_a_fused_model_loads_unfused(tmp_path):
    """Saving with fused projections installed writes the member layers only; the loaded model is unfused
    until set_backend installs the fusion again, with the same outputs."""
    m, inputs = _quantized_wan()
    dvdquant.set_backend(m, "emulated")
    path = dvdquant.save(m, tmp_path / "wan_fused.safetensors")
    loaded = dvdquant.load(path)
    assert fused_modules(loaded) == [] and not loaded.blocks[0].attn1.fused_projections
    dvdquant.set_backend(loaded, "emulated")
    assert len(fused_modules(loaded)) == 4
    with torch.no_grad():
        assert torch.equal(loaded(**inputs, return_dict=False)[0], m(**inputs, return_dict=False)[0])
