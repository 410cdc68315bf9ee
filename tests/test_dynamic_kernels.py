"""Dynamic smoothing on the kernels' pipeline (CPU): the emulated backend computes the simulated path's bits,
a sample's output does not depend on its batch, and the plan sends only the layouts the weight kernel runs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dvdquant
from dvdquant import DVDQuantConfig
from dvdquant.api import quantized_layers
from dvdquant.kernels import ExecutionConfig, LinearLayout, dynamic_smoothing_blocker, plan_forward
from dvdquant.nn import QuantLinear, RuntimeState
from dvdquant.nn.execution import emulated_forward, layout, plan
from dvdquant.numerics import grids
from tiny_models import TINY_MODELS, run

H100 = (9, 0)
N, L = 48, 21


def _layer(k=128, a_bits=4, a8_format="int", rotation_block=64, auto_scale="none", symmetric=False,
           master_bits=8, group_size=None, backend="emulated", seed=0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, k, generator=g) * 0.05)
        lin.weight[:, 5] = 0.0                                    # an all-zero column (colmax floor)
        lin.bias.copy_(torch.randn(N, generator=g))
    wq = grids.quantize_weight_minmax(lin.weight.detach(), 4, group_size)
    m = QuantLinear.from_params(lin, wq, a_bits=a_bits, a8_format=a8_format, rotation_block=rotation_block,
                                auto_scale=auto_scale, scale_block=32)
    m.set_dynamic_smoothing(lin.weight.detach(), alpha=0.5, master_bits=master_bits, symmetric=symmetric)
    m.layer_name = "dyn.test"
    m.state = RuntimeState(execution=ExecutionConfig(backend))
    return m


def _samples(n: int, seed: int, k: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L, k, generator=g) * (torch.rand(n, 1, k, generator=g) * 4 + 0.1)
    for i in range(n):
        x[i, :, (7 * i + seed) % k] *= 40.0 * (i + 1)
    x[..., 9] = 0.0                                               # an all-zero channel (s = 1)
    return x


FORMATS = [(4, "int"), (8, "int"), (8, "fp8_e4m3")]


@pytest.mark.parametrize("bits,a8", FORMATS)
@pytest.mark.parametrize("kw", [dict(), dict(symmetric=True), dict(rotation_block=None), dict(rotation_block=16),
                                dict(rotation_block=128), dict(auto_scale="per_block", scale_block=128)])
def test_emulated_equals_simulated(bits, a8, kw):
    kw = dict(kw)
    scale_block = kw.pop("scale_block", None)
    m = _layer(a_bits=bits, a8_format=a8, **kw)
    if scale_block:
        m.scale_block = scale_block                               # one block spanning K: per token
    assert m.per_token_scaling(bits)
    assert plan(m, "cpu", bits).path == "emulated"
    x = _samples(3, 11)
    with torch.no_grad():
        ref = m.forward_simulated(x)
        assert torch.equal(m(x), ref) and torch.equal(emulated_forward(m, x), ref)
        assert torch.equal(m(x.bfloat16()), m.forward_simulated(x.bfloat16()))


def test_code_gemm_order_of_the_reference():
    """The simulated path itself: per sample ((Σ c·(q_g − z_g)) · Δ_g) · s + b (the GEMM epilogue's order)."""
    from dvdquant.numerics.linear import linear_per_token_per_channel
    m = _layer(backend="simulated")
    x = _samples(2, 3)
    x2 = x.reshape(-1, 128)
    s = m.dynamic_smoothing(x2, 2)
    xt = m.transform_input(x2 / s.repeat_interleave(L, 0))
    codes, sc = grids.quantize_act_per_token_int(xt, 4)
    ys = []
    for g in range(2):
        p = m.smoothed_weight_params(s[g:g + 1])
        ys.append(linear_per_token_per_channel(codes[g * L:(g + 1) * L], sc[g * L:(g + 1) * L],
                                               p.codes.float() - p.zero, p.scale, m.bias, 7 * 15))
    with torch.no_grad():
        assert torch.equal(m(x), torch.cat(ys).reshape(2, L, N))


@pytest.mark.parametrize("backend", ["simulated", "emulated"])
@pytest.mark.parametrize("bits,a8", FORMATS)
def test_batch_independence(backend, bits, a8):
    m = _layer(a_bits=bits, a8_format=a8, backend=backend)
    x = _samples(1, 77)
    others = _samples(6, 5)
    with torch.no_grad():
        alone = m(x)
        batch = m(torch.cat([others[:3], x, others[3:]]))
        assert torch.equal(batch[3:4], alone)


def test_weight_only_steps_use_the_s1_weight():
    m = _layer(backend="emulated")
    m.state.a_bits = 16
    x = _samples(2, 4)
    with torch.no_grad():
        assert torch.equal(m(x), m.forward_simulated(x))


def test_nonfinite_input_raises_on_the_emulated_path():
    m = _layer(backend="emulated")
    x = _samples(2, 4)
    x[1, 3, 7] = float("nan")
    with pytest.raises(dvdquant.NonFiniteError), torch.no_grad():
        m(x)


@pytest.mark.parametrize("kw,why", [
    (dict(), ""), (dict(rotation_block=None), ""), (dict(group_size=128), ""),
    (dict(auto_scale="per_channel"), "per-channel activation balance"),
    (dict(auto_scale="per_block"), "per-block activation scales"),
    (dict(master_bits=16), "float (16-bit) master"),
    (dict(group_size=32), "group-wise weights"),
    (dict(k=96, rotation_block=48), "rotation of order 48"),             # Paley-based block
    (dict(k=96, rotation_block=32), "rotation of order 32"),             # K not a multiple of 64
])
def test_plan_picks_the_kernel_path_for_fusable_layers(kw, why):
    m = _layer(**kw)
    blocker = dynamic_smoothing_blocker(layout(m))
    assert (why in blocker and blocker.startswith("dynamic smoothing with")) if why else blocker == ""
    for backend, cap, expected in (("emulated", None, "emulated"), ("fp8", H100, "fp8"), ("fp8", None, "emulated")):
        m.state.execution = ExecutionConfig(backend)
        p = plan(m, "cpu", 4, capability=cap)
        assert p.path == ("simulated" if why else expected), (backend, p)
        assert (why in p.reason) if why else p.path != "simulated"
    x = _samples(2, 8, m.in_features)
    m.state.execution = ExecutionConfig("emulated")
    with torch.no_grad():
        assert torch.equal(m(x), m.forward_simulated(x))


def test_weight_only_layer_with_dynamic_smoothing_plans_as_any_weight_only_layer():
    lay = LinearLayout(256, 256, 4, True, None, 16, False, 0, "none", 128, False, False,
                       dynamic_smoothing=True)
    assert plan_forward(lay, ExecutionConfig("fp8"), "cpu", 16, capability=H100).path == "int4_gemv"


def test_tiny_model_emulated_equals_simulated():
    model, inputs = TINY_MODELS["wan"]()
    model.eval()
    dvdquant.quantize_(model, DVDQuantConfig(smoothing="dynamic", auto_scale="none", rotation_block=32))
    ref = run(model, inputs)
    dvdquant.set_backend(model, "emulated")
    layers = dict(quantized_layers(model))
    assert all(plan(q, "cpu", 4).path == "emulated" for q in layers.values() if q.dyn_alpha is not None)
    assert torch.equal(run(model, inputs), ref)
