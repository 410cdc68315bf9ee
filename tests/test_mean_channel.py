"""DVD-Quant ``mean_channel="exact"``: the mean of each rotation block kept out of the quantizers.

y = f(x_c) + x̄·Sᵀ, with x̄ the block means of the tokens, x_c the block-centred tokens, f the
quantized product of the block-centred weight (bias included) and S the FP weight's block row sums.
Checked: the formula, bit for bit on the simulated and emulated paths; a block-constant input
(x_c = 0) giving exactly the mean term; batch independence; checkpoints (format 3, old headers
load as "quantized"); the config / backend / fusion refusals.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dvdquant
from dvdquant import CheckpointError, ConfigError, DVDQuantConfig
from dvdquant.algorithms.dvd import center_blocks, dvdquant_layer
from dvdquant.config import config_from_fields, config_to_dict
from dvdquant.eval.quality import METHODS, plan_runs
from dvdquant.nn.execution import plan
from dvdquant.nn.fused import incompatibility
from dvdquant.nn.quant_linear import QuantLinear
from tiny_models import TINY_MODELS, run

K, N, L = 256, 48, 19


def _linear(k: int = K, offset: float = 0.05) -> nn.Linear:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(k, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, k, generator=g) * 0.05 + offset * torch.randn(N, 1, generator=g))
        lin.bias.copy_(torch.randn(N, generator=g))
    return lin


def _tokens(b: int, seed: int, k: int = K) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, k, generator=g) * (torch.rand(b, 1, k, generator=g) * 3 + 0.1)
    return x + torch.randn(b, L, 1, generator=g) * 2.0           # a per-token mean the rotation packs into one column


def _layer(mean: str = "exact", a_bits: int = 4, block: int = 64, auto_scale: str = "per_channel",
           backend: str = "simulated") -> QuantLinear:
    cfg = DVDQuantConfig(a_bits=a_bits, rotation=True, rotation_block=block, auto_scale=auto_scale, mean_channel=mean,
                         attention="none")
    m, _ = dvdquant_layer("l", _linear(), cfg)
    dvdquant.set_backend(m, backend)
    return m


def _without_mean(m: QuantLinear) -> QuantLinear:
    """The same quantized weights and settings, without the mean term (the formula's f)."""
    f = QuantLinear(m.in_features, m.out_features, w_bits=m.w_bits, group_size=m.group_size, a_bits=m.a_bits,
                    rotation_block=m.rotation_block, auto_scale=m.auto_scale, scale_block=m.scale_block)
    f.load_state_dict({k: v for k, v in m.state_dict().items() if k != "w_block_sum"})
    return f


@pytest.mark.parametrize("a_bits,auto_scale", [(4, "per_channel"), (8, "per_block"), (4, "none"), (16, "none")])
def test_forward_is_the_explicit_formula(a_bits, auto_scale):
    m = _layer(a_bits=a_bits, auto_scale=auto_scale)
    x = _tokens(1, 3)
    r = m.rotation_block
    xb = x.reshape(-1, K // r, r)
    xbar = xb.mean(dim=-1)                                          # (M, K/R)
    xc = (xb - xbar.unsqueeze(-1)).reshape(x.shape)
    with torch.no_grad():
        want = (_without_mean(m)(xc).reshape(-1, N) + xbar @ m.w_block_sum.t()).reshape(1, L, N)
        assert torch.equal(m(x), want)
        dvdquant.set_backend(m, "emulated")
        assert torch.equal(m(x), want)                              # the emulated path: the same bits


def test_weight_is_block_centred_and_sums_are_the_fp_weight():
    lin = _linear()
    m = _layer()
    w = lin.weight.detach().double()
    assert torch.allclose(m.w_block_sum.double(), w.reshape(N, -1, 64).sum(-1), rtol=1e-6, atol=1e-6)
    # Sylvester blocks: the constant Hadamard column (channel 0 of each block) no longer reaches the quantizer
    assert torch.equal(m.dequantized_weight()[:, ::64], torch.zeros(N, K // 64))
    wc, sums = center_blocks(lin.weight.detach(), 64)
    assert wc.dtype == torch.float64 and torch.allclose(wc.reshape(N, -1, 64).sum(-1), torch.zeros(N, K // 64, dtype=torch.float64),
                                                        atol=1e-12)


def test_block_constant_input_gives_exactly_the_mean_term():
    """x constant over each block: x_c = 0, so the quantizers see nothing and y = b + x̄·Sᵀ."""
    m, lin = _layer(), _linear()
    g = torch.Generator().manual_seed(1)
    levels = torch.round(torch.randn(1, L, K // 64, generator=g) * 24) / 8   # block sums and means exact in fp32
    x = levels.repeat_interleave(64, dim=-1)                        # (1, L, K), constant per block
    with torch.no_grad():
        y = m(x)
        assert torch.equal(y, (m.bias + levels.reshape(L, -1) @ m.w_block_sum.t()).reshape(1, L, N))
        ref = F.linear(x, lin.weight, lin.bias)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
        err_q = (_layer("quantized")(x) - ref).norm() / ref.norm()
        assert err_q > 1e-3                                         # today's path quantizes the mean


def test_exact_mean_lowers_the_error_on_offset_tokens():
    lin = _linear()
    x = _tokens(2, 4)
    ref = F.linear(x, lin.weight, lin.bias)
    with torch.no_grad():
        err = {mc: ((_layer(mc)(x) - ref).norm() / ref.norm()).item() for mc in ("quantized", "exact")}
    assert err["exact"] < err["quantized"]


CASES = list(itertools.product(["per_channel", "per_block"], [4, 8, 16], [64, 256], ["simulated", "emulated"]))


@pytest.mark.parametrize("auto_scale,a_bits,block,backend", CASES)
def test_sample_alone_equals_its_slice_in_a_batch(auto_scale, a_bits, block, backend):
    m = _layer(a_bits=a_bits, block=block, auto_scale=auto_scale, backend=backend)
    x = _tokens(1, 1000)
    with torch.no_grad():
        alone = m(x)
        for batch, pos in ((2, 1), (7, 3), (40, 39)):
            others = _tokens(batch - 1, batch)
            xb = torch.cat([others[:pos], x, others[pos:]])
            assert torch.equal(m(xb)[pos:pos + 1], alone), (batch, pos)


def test_bf16_input_keeps_its_dtype():
    m = _layer()
    x = _tokens(1, 2).bfloat16()
    with torch.no_grad():
        assert m(x).dtype == torch.bfloat16


def test_checkpoint_round_trip_and_header(tmp_path):
    model, inputs = TINY_MODELS["wan"]()
    model.eval()
    cfg = DVDQuantConfig(mean_channel="exact")
    dvdquant.quantize_(model, cfg)
    assert model.get_submodule("blocks.0.ffn.net.2").w_block_sum is not None
    path = dvdquant.save(model, tmp_path / "q.safetensors")
    meta = dvdquant.read_metadata(path)
    assert meta["format_version"] == 3 and meta["config"]["fields"]["mean_channel"] == "exact"
    rotated = [lm for lm in meta["layers"].values() if lm["rotation_block"]]
    assert rotated and all(lm["mean_channel"] == "exact" for lm in rotated)
    loaded = dvdquant.load(path)
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and any(k.endswith("w_block_sum") for k in sd_a)
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert torch.equal(run(model, inputs), run(loaded, inputs))
    assert loaded._dvdquant_config == cfg


def test_default_checkpoint_unchanged_and_old_headers_read_as_quantized(tmp_path):
    model, _ = TINY_MODELS["wan"]()
    dvdquant.quantize_(model, DVDQuantConfig())
    meta = dvdquant.read_metadata(dvdquant.save(model, tmp_path / "q.safetensors"))
    assert meta["format_version"] == 1 and not any("mean_channel" in lm for lm in meta["layers"].values())
    fields = dict(config_to_dict(DVDQuantConfig())["fields"])
    del fields["mean_channel"]                                      # a header written before the option
    assert config_from_fields(DVDQuantConfig, fields).mean_channel == "quantized"


def test_bad_layer_entry_is_one_line(tmp_path):
    from dvdquant.serialization import layer_meta, quant_linear_from_meta
    lm = layer_meta(_layer())
    assert quant_linear_from_meta(lm, "cpu").w_block_sum.shape == (N, K // 64)
    for bad in ({"mean_channel": "maybe"}, {"rotation_block": None}):
        with pytest.raises(CheckpointError, match="mean_channel"):
            quant_linear_from_meta(dict(lm, **bad), "cpu")


def test_config_refusals():
    with pytest.raises(ConfigError, match="mean_channel"):
        DVDQuantConfig(mean_channel="centre")
    with pytest.raises(ConfigError, match="rotation=True"):
        DVDQuantConfig(mean_channel="exact", rotation=False)
    with pytest.raises(ConfigError, match="smoothing"):
        DVDQuantConfig(mean_channel="exact", smoothing="dynamic")
    assert DVDQuantConfig(mean_channel="exact").weight_only().mean_channel == "quantized"


def test_fp8_backend_falls_back_to_emulated_and_fusion_is_refused():
    m = _layer(auto_scale="per_block", a_bits=4, backend="fp8")
    p = plan(m, "cpu", 4, capability=(9, 0))
    assert p.path == "emulated" and "mean" in p.reason
    dvdquant.set_backend(m, "auto")
    assert plan(m, "cpu", 8, capability=(9, 0)).path == "emulated"
    x = _tokens(1, 5)
    with torch.no_grad():
        dvdquant.set_backend(m, "simulated")
        sim = m(x)
        dvdquant.set_backend(m, "fp8")                              # on this CPU: the emulated path
        assert torch.equal(m(x), sim)
    other = _layer(auto_scale="per_block", a_bits=4)
    other.state = m.state                                            # siblings of one model share its state
    assert "mean" in incompatibility([m, other])


def test_eval_specs():
    assert METHODS["dvdquant-centered"].build(__import__("dvdquant.eval.quality", fromlist=["BITS"]).BITS["W4A4"]
                                              ).mean_channel == "exact"
    runs = plan_runs("dvdquant-centered,dvdquant-no-rotation,dvdquant-rotated", "all")
    assert {b for m, b in runs if m == "dvdquant-centered"} == {"W4A8", "W4A6", "W4A4"}
    assert {b for m, b in runs if m == "dvdquant-no-rotation"} == {"W4A6", "W4A4"}   # W4A8: the default
    assert {b for m, b in runs if m == "dvdquant-rotated"} == {"W4A8"}
    bits = __import__("dvdquant.eval.quality", fromlist=["BITS"]).BITS
    assert METHODS["dvdquant-centered"].build(bits["W4A8"]).rotates()
    assert not METHODS["dvdquant"].build(bits["W4A8"]).rotates() and METHODS["dvdquant"].build(bits["W4A6"]).rotates()


def test_plan_refuses_a_named_method_with_no_row():
    """A method asked for by name at bit-widths it is not defined at is an error, not a silent no-op."""
    assert ("dvdquant-no-bgr", "W4A8") in plan_runs("dvdquant-no-bgr", "W4A8")
    assert plan_runs("dvdquant-no-gbs,minmax", "W4A4,W4A6") == [("minmax", "W4A4"), ("dvdquant-no-gbs", "W4A6"),
                                                               ("minmax", "W4A6")]
    with pytest.raises(ValueError, match="dvdquant-no-gbs: not defined at W4A4"):
        plan_runs("dvdquant-no-gbs,minmax", "W4A4")
    assert len(plan_runs()) == sum(1 for b in ("W8A8", "W4A8", "W4A6", "W4A4") for m in METHODS.values()
                                   if m.only_bits is None or b in m.only_bits)


def test_static_a6_row_is_the_baselines_w4a6():
    from dvdquant.eval.quality import BITS
    cfg = METHODS["dvdquant-static-a6"].build(BITS["W4A6"])
    assert cfg.a_bits == 6 and cfg.gbs is None and cfg.rotates()
    assert plan_runs("dvdquant-static-a6", "all") == [("dvdquant-static-a6", "W4A6")]
