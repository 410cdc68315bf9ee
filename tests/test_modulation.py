"""AdaLN modulation layers: quantized weight-only (W4A16) with ``quantize_modulation=True``.

Their input is one timestep embedding per sample, so they keep floating-point activations,
get no rotation / auto-scaling, ignore δ-GBS, and round-trip through checkpoints; with
``quantize_modulation=False`` they stay ``nn.Linear``. Also the weight-memory count of
``benchmarks/weight_memory.py`` against a really quantized tiny model.
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn as nn

import dvdquant
from dvdquant import BGRConfig, DVDQuantConfig, GBSConfig, MinMaxConfig, QuaRotConfig, SmoothQuantConfig
from dvdquant.errors import ConfigError
from dvdquant.kernels import ExecutionConfig
from dvdquant.nn import QuantLinear, RuntimeState
from dvdquant.nn.execution import dequantized_weight, plan
from dvdquant.numerics import grids
from tiny_models import tiny_hunyuan, tiny_wan, run

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

FAST = BGRConfig(shrink_steps=6, max_iters=10)
HUNYUAN_MOD = {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
               "single_transformer_blocks.0.norm.linear"}


@pytest.fixture(scope="module")
def hunyuan_fp():
    torch.manual_seed(0)
    model, inputs = tiny_hunyuan()
    return model.eval(), inputs


@pytest.fixture(scope="module")
def hunyuan_q(hunyuan_fp):
    model, inputs = copy.deepcopy(hunyuan_fp[0]), hunyuan_fp[1]
    report = dvdquant.quantize_(model, DVDQuantConfig(bgr=FAST, quantize_modulation=True))
    return model, inputs, report


def test_modulation_layers_are_weight_only(hunyuan_q):
    model, _, report = hunyuan_q
    rows = {l.name: l for l in report.layers}
    assert HUNYUAN_MOD <= set(rows)
    for name, m in dvdquant.quantized_layers(model):
        if name in HUNYUAN_MOD:
            assert (m.a_bits, m.rotation_block, m.auto_scale, m.dyn_alpha) == (16, None, "none", None)
            assert (rows[name].a_bits, rows[name].method, rows[name].w_bits) == (16, "dvdquant", 4)
            assert "bgr_iters" in rows[name].extras            # BGR weights, as the other layers
        else:
            assert m.a_bits == 4 and m.rotation_block and m.auto_scale == "per_channel"


def test_weight_only_ignores_gbs_override(hunyuan_q):
    model, _, _ = hunyuan_q
    m = model.get_submodule("transformer_blocks.0.norm1.linear")
    other = model.get_submodule("transformer_blocks.0.attn.to_q")
    x = torch.randn(2, m.in_features)
    ref = x @ dequantized_weight(m).t() + m.bias.float()        # fp32 activations, quantized weight
    state = dvdquant.get_state(model)
    try:
        for bits in (4, 8, None):
            state.a_bits = bits
            assert m.current_a_bits() == 16 and other.current_a_bits() == (bits or 4)
            assert torch.equal(m(x), ref)
            # fp8 backend: weight-only layers take their own A16 path (the int4 GEMV on CUDA, emulated
            # on this CPU), eager and compiled, whatever the step's bits
            state.execution = ExecutionConfig("fp8")
            for b in (None, bits):
                p = plan(m, "cuda", b, capability=(9, 0))
                assert p.path == "int4_gemv" and p.reason == ""
            assert torch.equal(m(x), ref)
            state.execution = ExecutionConfig()
    finally:
        state.reset()
        state.execution = ExecutionConfig()


def test_fp8_op_keeps_a16_for_weight_only():
    pytest.importorskip("triton")
    from dvdquant.kernels.fp8 import resolve_bits
    assert resolve_bits(torch.tensor([4], dtype=torch.int32), 16) == 16
    assert resolve_bits(torch.tensor([8], dtype=torch.int32), 4) == 8
    assert resolve_bits(torch.tensor([-1], dtype=torch.int32), 4) == 4


def test_compiled_weight_only_layer_never_recompiles():
    """No guard on the δ-GBS bits for a weight-only layer: one graph across A4/A8 switches (CPU, aot_eager)."""
    import torch._dynamo.testing as dtest
    torch.manual_seed(0)
    lin = nn.Linear(64, 384)
    m = QuantLinear.from_params(lin, grids.quantize_weight_minmax(lin.weight.detach(), 4), a_bits=16)
    m.state = RuntimeState(execution=ExecutionConfig("fp8"))
    state, x = m.state, torch.randn(2, 64)
    counter = dtest.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(m, backend=counter, fullgraph=True)
    with torch.no_grad():
        for bits in (4, 8, 4, None):
            state.a_bits = bits
            assert torch.equal(compiled(x), m.forward_simulated(x))
    assert counter.frame_count == 1


def test_gbs_with_a16_config_is_refused():
    with pytest.raises(ConfigError, match="weight-only"):
        DVDQuantConfig(a_bits=16, gbs=GBSConfig())
    wo = DVDQuantConfig(gbs=GBSConfig(), smoothing="dynamic", rotation_block=64).weight_only()
    assert (wo.a_bits, wo.gbs, wo.rotation, wo.auto_scale, wo.smoothing, wo.bgr) == \
        (16, None, False, "none", "none", DVDQuantConfig().bgr)


def test_checkpoint_roundtrip_and_backends(hunyuan_fp, hunyuan_q, tmp_path):
    model, inputs, _ = hunyuan_q
    path = dvdquant.save(model, tmp_path / "q.safetensors")
    meta = dvdquant.read_metadata(path)
    assert all(meta["layers"][n]["a_bits"] == 16 and meta["layers"][n]["rotation_block"] is None
               for n in HUNYUAN_MOD)
    loaded = dvdquant.load(path, model=copy.deepcopy(hunyuan_fp[0]))
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(loaded.get_submodule(n).a_bits == 16 for n in HUNYUAN_MOD)
    ref = run(model, inputs)
    for backend in ("simulated", "emulated", "fp8"):           # fp8 on a CPU: emulated, bit-identical
        dvdquant.set_backend(loaded, backend)
        assert torch.equal(run(loaded, inputs), ref), backend
    dvdquant.set_backend(loaded, "simulated")


def test_modulation_false_leaves_nn_linear(hunyuan_fp):
    model = copy.deepcopy(hunyuan_fp[0])
    report = dvdquant.quantize_(model, MinMaxConfig(quantize_modulation=False))
    assert not HUNYUAN_MOD & {l.name for l in report.layers}
    assert all(type(model.get_submodule(n)) is nn.Linear for n in HUNYUAN_MOD)


@pytest.mark.parametrize("cfg_cls", [QuaRotConfig, SmoothQuantConfig])
def test_baselines_quantize_modulation_with_rtn(cfg_cls):
    model, inputs = tiny_wan()
    report = dvdquant.quantize_(model, cfg_cls(quantize_modulation=True), calibration=lambda m: run(m, inputs))
    row = report.layers[0]
    m = model.condition_embedder.time_proj
    assert (row.name, row.method, row.a_bits) == ("condition_embedder.time_proj", "minmax", 16)
    assert m.smooth is None and m.rotation_block is None and m.a_bits == 16
    assert report.method == cfg_cls.__name__.replace("Config", "").lower()


def test_weight_memory_count_matches_real_quantization(hunyuan_fp):
    from weight_memory import count_weight_bytes
    model = copy.deepcopy(hunyuan_fp[0]).to(torch.bfloat16)
    cfg = MinMaxConfig(quantize_modulation=True)           # same buffers as DVD-Quant, faster
    counted = count_weight_bytes(copy.deepcopy(model).to("meta"), cfg)
    real = copy.deepcopy(model)
    dvdquant.quantize_(real, cfg)
    assert counted["quant_bytes"] == sum(t.numel() * t.element_size() for t in real.state_dict().values())
    assert counted["bf16_bytes"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert counted["weight_only_layers"] == 3 and counted["ratio"] < 1
    fp = count_weight_bytes(copy.deepcopy(model).to("meta"), MinMaxConfig(quantize_modulation=False))
    assert fp["layers"] == counted["layers"] - 3 and fp["quant_bytes"] > counted["quant_bytes"]
