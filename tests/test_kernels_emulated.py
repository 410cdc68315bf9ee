"""EMULATED backend == simulated QuantLinear, bit for bit; and the dispatch decisions (CPU only).

Equality is asserted with ``torch.equal`` (not a tolerance): the emulated path performs the
same fp32 operations in the same order as ``forward_simulated`` — it only materialises the
integer codes and scales in between; with per-token scales both take the exact code-GEMM order
of :mod:`dvdquant.numerics.linear` — so any difference is a bug, not rounding.
These tests never import triton (the interpreter tests in test_kernels_triton.py run in a
subprocess, so import order does not matter either way).
"""
from __future__ import annotations

import itertools
import logging

import pytest
import torch
import torch.nn as nn

from dvdquant.errors import ConfigError, NonFiniteError
from dvdquant.kernels import ExecutionConfig
from dvdquant.nn import QuantLinear, RuntimeState
from dvdquant.nn.execution import emulated_forward, quantize_activations
from dvdquant.nn.execution import plan as plan_forward
from dvdquant.numerics import grids
from dvdquant.numerics.hadamard import hadamard_matrix


def make_layer(k=192, n=80, *, w_bits=4, group_size=None, a_bits=4, a8_format="int", rotation_block=None,
               auto_scale="none", scale_block=64, smooth_steps=0, balance_steps=0, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    wq = grids.quantize_weight_minmax(lin.weight.detach(), w_bits, group_size)
    smooth = torch.rand(smooth_steps, k, generator=g) + 0.5 if smooth_steps else None
    balance = torch.rand(balance_steps, k, generator=g) + 0.5 if balance_steps else None
    m = QuantLinear.from_params(lin, wq, a_bits=a_bits, a8_format=a8_format, rotation_block=rotation_block,
                                auto_scale=auto_scale, scale_block=scale_block, smooth=smooth,
                                act_balance=balance)
    m.layer_name = "test.layer"
    return m


def use(m, backend: str, **options) -> None:
    """Run ``m`` on ``backend`` (and options): the execution config of its state (a new one if it has none)."""
    if m.state is None:
        m.state = RuntimeState()
    m.state.execution = ExecutionConfig(backend, **options)


def tokens(shape=(2, 37, 192), dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * (torch.rand(shape[-1], generator=g) * 4 + 0.1)
    x[..., 5] *= 30.0  # an outlier channel
    return x.to(dtype)


GRID = list(itertools.product(["none", "per_block", "per_channel"], [None, 16, 64, 192], [4, 6, 8],
                              ["int", "fp8_e4m3"]))


@pytest.mark.parametrize("auto_scale,rot,bits,a8", GRID)
def test_emulated_equals_simulated(auto_scale, rot, bits, a8):
    m = make_layer(rotation_block=rot, auto_scale=auto_scale, a_bits=bits, a8_format=a8)
    x = tokens()
    assert torch.equal(emulated_forward(m, x), m.forward_simulated(x))


@pytest.mark.parametrize("case", [
    dict(smooth_steps=1), dict(smooth_steps=3, rotation_block=64), dict(balance_steps=2),
    dict(group_size=32), dict(group_size=64, w_bits=3), dict(w_bits=8), dict(bias=False),
    dict(k=190, n=33, rotation_block=None), dict(a_bits=16), dict(auto_scale="per_block", scale_block=128),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_equals_simulated_variants(case, dtype):
    k = case.pop("k", 192)
    m = make_layer(k=k, **case)
    m.state = RuntimeState(step_index=2)
    x = tokens((3, 11, k), dtype)
    assert torch.equal(emulated_forward(m, x), m.forward_simulated(x))


def test_bit_switching_follows_state_without_weight_copies():
    m = make_layer(rotation_block=64, auto_scale="per_block")
    m.state = RuntimeState(execution=ExecutionConfig("emulated"))
    x = tokens()
    before = {n: b.data_ptr() for n, b in m.named_buffers()}
    for bits in (4, 8, 4, 6):
        m.state.a_bits = bits
        assert torch.equal(m(x), m.forward_simulated(x))
    assert before == {n: b.data_ptr() for n, b in m.named_buffers()}


def test_codes_are_integers_on_the_grid():
    m = make_layer(auto_scale="per_block")
    qa = quantize_activations(m, m.transform_input(tokens().reshape(-1, 192)), 4)
    assert qa.codes.dtype == torch.int8 and qa.scale.shape == (74, 3)
    assert int(qa.codes.abs().max()) <= 7


def test_nan_input_raises():
    m = make_layer()
    use(m, "emulated")
    x = tokens()
    x[0, 3, 7] = float("nan")
    with pytest.raises(NonFiniteError):
        m(x)


# ------------------------------------------------------------------------------ dispatch
H100 = (9, 0)


@pytest.mark.parametrize("kwargs,bits,reason", [
    (dict(k=200, n=64), 4, "multiples of 16"),
    (dict(k=192, n=72), 4, "multiples of 16"),
    (dict(group_size=64), 4, "group-wise"),
    (dict(auto_scale="per_channel"), 4, "per_channel"),
    (dict(balance_steps=1), 4, "act_balance"),
    (dict(auto_scale="per_block", scale_block=64), 4, "scale_block=128"),
    (dict(w_bits=8), 4, "packed 4-bit"),
    (dict(), 16, "16-bit"),
])
def test_plan_falls_back(kwargs, bits, reason):
    k = kwargs.pop("k", 256)
    m = make_layer(k=k, **kwargs)
    use(m, "fp8")
    plan = plan_forward(m, "cuda", bits, capability=H100)
    assert plan.path == "emulated" and reason in plan.reason


@pytest.mark.parametrize("kwargs,path", [
    (dict(), "int4_gemv"),                          # packed per-channel int4, no input transform
    (dict(group_size=64), "emulated"),              # group-wise Δ: the GEMV has one Δ per row
    (dict(rotation_block=64), "emulated"),          # an online rotation before the matmul
    (dict(w_bits=8), "emulated"),
])
def test_plan_weight_only(kwargs, path):
    m = make_layer(k=256, a_bits=16, **kwargs)
    for backend in ("fp8", "auto"):
        use(m, backend)
        for bits in (None, 4, 8):                   # δ-GBS overrides never change a weight-only plan
            assert plan_forward(m, "cuda", bits, capability=H100).path == path
    assert plan_forward(m, "cpu", None).path == "emulated"          # no CUDA: emulated, silently
    use(m, "emulated")
    assert plan_forward(m, "cuda", None, capability=H100).path == "emulated"


def test_plan_fp8_choices():
    m = make_layer(k=256, n=96, rotation_block=128, auto_scale="per_block", scale_block=128)
    use(m, "fp8")
    assert plan_forward(m, "cuda", 4, capability=H100) == plan_forward(m, "cuda", 4, capability=H100)
    p4, p8 = plan_forward(m, "cuda", 4, capability=H100), plan_forward(m, "cuda", 8, capability=H100)
    assert (p4.path, p4.fmt, p4.per_block) == ("fp8", "int", True)
    assert (p8.path, p8.fmt, p8.per_block) == ("fp8", "fp8", True) and "not exact" in p8.note
    m.a8_format = "fp8_e4m3"
    assert plan_forward(m, "cuda", 8, capability=H100).note == ""
    m.a8_format, m.auto_scale = "int", "none"        # per token, default: the int grid itself (INT8 GEMM)
    for bits in (6, 8):
        p = plan_forward(m, "cuda", bits, capability=H100)
        assert (p.path, p.fmt, p.per_block, p.note) == ("fp8", "int", False, "")
    use(m, "fp8", int8_gemm=False)                    # opt-out: e4m3 substitute, noted
    p = plan_forward(m, "cuda", 8, capability=H100)
    assert p.fmt == "fp8" and "not exact" in p.note
    use(m, "fp8")
    m.auto_scale = "per_block"
    # Ada has row-wise FP8 but no blockwise scaling
    assert plan_forward(m, "cuda", 4, capability=(8, 9)).path == "emulated"
    m.auto_scale = "none"
    assert plan_forward(m, "cuda", 4, capability=(8, 9)).path == "fp8"
    assert plan_forward(m, "cuda", 4, capability=(8, 0)).path == "emulated"


@pytest.mark.parametrize("k,block", [(208, 128), (192, 192)])
def test_plan_per_block_that_falls_back_to_per_token(k, block):
    """K not a multiple of scale_block, or one block spanning K: the simulated path uses one scale per
    token (and the exact code-GEMM order), so does fp8."""
    m = make_layer(k=k, n=64, auto_scale="per_block", scale_block=block)
    use(m, "fp8")
    p = plan_forward(m, "cuda", 4, capability=H100)
    assert (p.path, p.per_block) == ("fp8", False)
    assert m.per_token_scaling(4)


@pytest.mark.parametrize("kw,expected", [
    (dict(), True), (dict(rotation_block=64), True), (dict(a_bits=8, a8_format="fp8_e4m3"), True),
    (dict(auto_scale="per_channel"), False), (dict(auto_scale="per_block"), False), (dict(group_size=64), False),
    (dict(balance_steps=1), False), (dict(a_bits=16), False)])
def test_per_token_layers_use_the_exact_code_gemm_order(kw, expected):
    """Per-token scales and per-channel steps: y = ((Σ c·W_int) · Δ) · s + b with an exact sum (the FP8
    GEMM's epilogue order), on the simulated and the emulated path alike; other layouts fake-quantize."""
    m = make_layer(**kw)
    bits = m.a_bits
    assert m.per_token_scaling(bits) is expected
    x = tokens()
    y = m.forward_simulated(x)
    assert torch.equal(y, emulated_forward(m, x))
    if expected:
        x2 = m.transform_input(x.reshape(-1, 192).float())
        qa = quantize_activations(m, x2, bits)
        w_int = m.weight_params().codes.float() - m.w_zero                      # (N, K) integers q − z
        acc = (qa.codes.double() @ w_int.double().t()).float()
        ref = ((acc * m.w_scale.t()) * qa.scale) + m.bias.float()
        assert torch.equal(y.reshape(-1, 80), ref)


def test_plan_cpu_and_unknown_backend():
    m = make_layer()
    use(m, "auto")
    assert plan_forward(m, torch.device("cpu"), 4) == plan_forward(m, "cpu", 4)
    assert plan_forward(m, "cpu", 4).path == "emulated" and plan_forward(m, "cpu", 4).reason == ""
    use(m, "fp8")
    assert "sm89" in plan_forward(m, "cpu", 4).reason
    with pytest.raises(ConfigError, match="unknown backend"):
        use(m, "int4-magic")


@pytest.mark.parametrize("kw,match", [(dict(attention_path="cuda"), "attention_path"),
                                      (dict(fast_accum=1), "fast_accum"), (dict(int8_gemm="no"), "int8_gemm")])
def test_execution_config_validates(kw, match):
    with pytest.raises(ConfigError, match=match):
        ExecutionConfig("fp8", **kw)


def test_set_backend_sets_one_config_on_the_state():
    import dvdquant
    model = nn.Sequential(make_layer(), make_layer())
    assert all(m.execution == ExecutionConfig() for m in model)        # no state: the simulated reference, exact
    ex = dvdquant.set_backend(model, "fp8", fast_accum=True, exact_rotation=False, int8_gemm=False)
    assert model[0].state is model[1].state and model[0].state.execution is ex   # one config, held once
    assert ex == ExecutionConfig("fp8", fast_accum=True, exact_rotation=False, int8_gemm=False)
    dvdquant.set_backend(model, "emulated")
    assert all(m.execution == ExecutionConfig("emulated") for m in model)
    with pytest.raises(ConfigError, match="unknown backend"):
        dvdquant.set_backend(model, "int4-magic")
    assert all(m.execution.backend == "emulated" for m in model)  # nothing changed
    model[0].state.reset()                                          # a new sampling loop keeps the config
    assert model[0].execution.backend == "emulated"


def test_forward_fp8_on_cpu_falls_back_once(caplog):
    m = make_layer()
    use(m, "fp8")
    m.layer_name = "blocks.0.ff"
    x = tokens()
    with caplog.at_level(logging.INFO, logger="dvdquant"):
        y1, y2 = m(x), m(x)
    assert torch.equal(y1, m.forward_simulated(x)) and torch.equal(y2, y1)
    lines = [r for r in caplog.records if "blocks.0.ff" in r.getMessage()]
    assert len(lines) == 1 and "falling back" in lines[0].getMessage()


def test_hadamard_used_by_fused_kernel_is_plus_minus_one():
    for r in (16, 64, 128, 256):
        h = hadamard_matrix(r)
        assert torch.allclose(h.abs() * r ** 0.5, torch.ones_like(h), atol=1e-6)
