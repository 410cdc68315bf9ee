"""The same input gives the same output, bit for bit, whatever else is in the batch.

Every run-time statistic (ARQ's Λ_t, dynamic smoothing's s_t, the 8-bit attention's K/V means and
scales, per-token scales) is taken per sample: over one batch element's tokens (and per head in
attention), never across batch elements. So one prompt's output alone equals its slice in a batch
of other prompts, and the conditional and unconditional halves of classifier-free guidance do not
see each other. Asserted with ``torch.equal`` on the CPU reference paths (simulated and emulated
linears, the emulated 8-bit attention, a whole quantized tiny transformer and the embedded model's
sampler).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from dvdquant.kernels import ExecutionConfig
from dvdquant.nn import QuantLinear, RuntimeState
from dvdquant.numerics import grids

K, N, L = 128, 48, 21


def _layer(auto_scale: str, a_bits: int, rotation_block, backend: str, k: int = K) -> QuantLinear:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(k, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, k, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(N, generator=g))
    wq = grids.quantize_weight_minmax(lin.weight.detach(), 4, None)
    m = QuantLinear.from_params(lin, wq, a_bits=a_bits, rotation_block=rotation_block, auto_scale=auto_scale,
                                scale_block=32)
    m.state = RuntimeState(execution=ExecutionConfig(backend))
    return m


def _samples(n: int, seed: int, k: int = K) -> torch.Tensor:
    """(n, L, k) tokens; each sample has its own outlier channel and scale, so a batch-wide Λ_t would move."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L, k, generator=g) * (torch.rand(n, 1, k, generator=g) * 4 + 0.1)
    for i in range(n):
        x[i, :, (7 * i + seed) % k] *= 40.0 * (i + 1)
    return x


def _in_batch(fn, x_one: torch.Tensor, batch: int, pos: int, seed: int) -> torch.Tensor:
    others = _samples(batch - 1, seed, x_one.shape[-1])
    xb = torch.cat([others[:pos], x_one, others[pos:]])
    return fn(xb)[pos:pos + 1]


LAYER_CASES = list(itertools.product(["per_channel", "per_block", "none"], [4, 8], [None, 64],
                                     ["simulated", "emulated"]))


@pytest.mark.parametrize("auto_scale,a_bits,rot,backend", LAYER_CASES)
def test_quant_linear_sample_alone_equals_its_slice_in_a_batch(auto_scale, a_bits, rot, backend):
    m = _layer(auto_scale, a_bits, rot, backend)
    x = _samples(1, 1000)
    with torch.no_grad():
        alone = m(x)
        for batch, pos in ((2, 1), (7, 3), (40, 39)):
            assert torch.equal(_in_batch(m, x, batch, pos, seed=batch), alone), (batch, pos)


@pytest.mark.parametrize("backend", ["simulated", "emulated"])
def test_quant_linear_per_sample_under_context_parallel_state(backend):
    """A RuntimeState without a process group reduces nothing; the per-sample Λ is (B, K)."""
    m = _layer("per_channel", 4, 64, backend)
    m.state = RuntimeState(execution=ExecutionConfig(backend))
    x = _samples(1, 5)
    with torch.no_grad():
        assert torch.equal(_in_batch(m, x, 3, 0, seed=9), m(x))


def test_two_dim_input_is_one_group():
    """(M, K) inputs carry no batch axis: all M rows share one Λ_t (documented in QuantLinear)."""
    m = _layer("per_channel", 4, None, "simulated")
    x = _samples(2, 3)                                        # (2, L, K)
    with torch.no_grad():
        flat = m(x.reshape(-1, K))                            # one group of 2·L tokens
        per_sample = m(x).reshape(-1, N)
        alone = torch.cat([m(x[i:i + 1]) for i in range(2)]).reshape(-1, N)
        assert torch.equal(per_sample, alone) and not torch.equal(flat, per_sample)
        assert torch.equal(m(x[0]), alone[:L])                # one sample as (L, K): the same single group


def test_dynamic_smoothing_is_per_sample():
    """Dynamic smoothing re-quantizes the weight from each sample's own Λ_t."""
    m = _layer("per_channel", 4, 64, "simulated")
    g = torch.Generator().manual_seed(4)
    m.set_dynamic_smoothing(torch.randn(N, K, generator=g) * 0.05, alpha=0.5)
    x = _samples(1, 77)
    with torch.no_grad():
        alone = m(x)
        for batch, pos in ((2, 0), (7, 5)):
            assert torch.equal(_in_batch(m, x, batch, pos, seed=batch + 1), alone)


@pytest.mark.parametrize("block,k", [(64, K), (48, 96)])    # Sylvester fast path; Paley-based exact sums
def test_dynamic_smoothing_weights_do_not_depend_on_their_chunk(monkeypatch, block, k):
    """The per-sample weights Q(W·diag(s_g)·H) are re-quantized several samples at a time; how many
    share a chunk (the layer's size decides) must not change any sample's bits."""
    import dvdquant.nn.quant_linear as ql
    m = _layer("per_channel", 4, block, "simulated", k)
    g = torch.Generator().manual_seed(5)
    m.set_dynamic_smoothing(torch.randn(N, k, generator=g) * 0.05, alpha=0.5)
    s = torch.rand(40, k, generator=g) * 3 + 0.1
    one_by_one = torch.stack([m.smoothed_weight(si) for si in s])
    for chunk in (1, 7, 40):
        monkeypatch.setattr(ql, "SMOOTHED_CHUNK_ELEMENTS", chunk * N * k)
        assert torch.equal(torch.stack(list(m.smoothed_weights(s))), one_by_one), chunk
    x = _samples(1, 33, k)
    with torch.no_grad():
        alone = m(x)
        assert torch.equal(_in_batch(m, x, 40, 17, seed=9), alone)


def test_quantized_attention_reference_is_per_batch_element():
    from dvdquant.kernels.attention_ref import quant_attention_reference
    g = torch.Generator().manual_seed(0)
    B, Lq, Lk, H, D = 5, 37, 300, 2, 64
    q, k, v = (torch.randn(B, n, H, D, generator=g) for n in (Lq, Lk, Lk))
    k = k + torch.randn(B, 1, H, D, generator=g) * 3                 # per-sample K bias (smoothing)
    v = v * torch.rand(B, 1, 1, D, generator=g) * 5
    for fmt in ("int8", "fp8"):
        full, lse = quant_attention_reference(q, k, v, qk_format=fmt, return_lse=True)
        for i in (0, 3):
            one, lse1 = quant_attention_reference(q[i:i + 1], k[i:i + 1], v[i:i + 1], qk_format=fmt,
                                                  return_lse=True)
            assert torch.equal(full[i:i + 1], one) and torch.equal(lse[i:i + 1], lse1), (fmt, i)


# --------------------------------------------------------------------------- whole models
def _fp_layers_per_sample(model: nn.Module) -> None:
    """Test harness: run the model's *unquantized* nn.Linear / nn.Conv layers one sample at a time.

    CPU BLAS (MKL here) blocks an fp32 GEMM by its row count, so a stock ``nn.Linear`` or
    ``nn.Conv3d`` gives a sample's rows bits that change with the batch size (the float model
    itself differs by ~6e-7 between batch 1 and 2 on this 2-core CPU), and a 4-bit quantizer
    turns such last-bit differences into code flips. Those layers are diffusers' (patch embedding,
    timestep and text embedders, output projection) or the text encoder's, not dvdquant's; running
    them per sample removes their batch dependence so that what is asserted is dvdquant's own.
    QuantLinear is not touched (its float GEMMs are per sample by construction).
    """
    for mod in model.modules():
        if type(mod) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
            fwd = mod.forward
            mod.forward = (lambda f: lambda x: torch.cat([f(x[i:i + 1]) for i in range(x.shape[0])]))(fwd)


@pytest.fixture(scope="module")
def tiny_quantized_wan():
    import dvdquant
    from dvdquant.config import BGRConfig, DVDQuantConfig
    from tiny_models import tiny_wan
    m, _ = tiny_wan(head_dim=64)
    # the default config (W4A4, BGR, ARQ per_channel, 8-bit int8 attention); fewer BGR search steps
    dvdquant.quantize_(m, DVDQuantConfig(bgr=BGRConfig(shrink_steps=6, max_iters=10)))
    _fp_layers_per_sample(m)
    return m.eval()


def _wan_inputs(n: int, seed: int, lv: int = 8):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(n, 4, 2, lv, lv, generator=g) * (1 + torch.rand(n, 1, 1, 1, 1, generator=g)),
                timestep=torch.randint(1, 1000, (n,), generator=g),
                encoder_hidden_states=torch.randn(n, 8, 32, generator=g) * 3)


def _cat(a: dict, b: dict, pos: int) -> dict:
    return {k: torch.cat([b[k][:pos], a[k], b[k][pos:]]) for k in a}


def test_tiny_wan_default_config_one_sample_alone_equals_batched(tiny_quantized_wan):
    from dvdquant.nn.attention import quantized_attention_mode
    from tiny_models import run
    m = tiny_quantized_wan
    assert quantized_attention_mode(m) == "int8"
    one = _wan_inputs(1, 100, lv=16)                 # 256 video tokens: the self-attention runs 8-bit
    alone = run(m, one)
    for batch, pos in ((2, 1), (7, 2)):
        out = run(m, _cat(one, _wan_inputs(batch - 1, batch, lv=16), pos))
        assert torch.equal(out[pos:pos + 1], alone), (batch, pos)
    # classifier-free guidance: the same latents and step, conditional and unconditional context
    uncond = dict(one, encoder_hidden_states=torch.zeros_like(one["encoder_hidden_states"]))
    cfg = run(m, _cat(one, uncond, 1))
    assert torch.equal(cfg[1:2], alone) and torch.equal(cfg[0:1], run(m, uncond))


@pytest.mark.slow
def test_embedded_generate_one_prompt_alone_equals_in_a_batch_of_four():
    import copy

    import dvdquant
    from dvdquant.config import BGRConfig, DVDQuantConfig
    from dvdquant.models.embedded import load_embedded
    from dvdquant.pipeline import generate
    model = copy.deepcopy(load_embedded())
    dvdquant.quantize_(model.transformer, DVDQuantConfig(bgr=BGRConfig(shrink_steps=4, max_iters=4)))
    _fp_layers_per_sample(model.transformer)
    _fp_layers_per_sample(model.text_encoder)
    prompt = "a red square moving left on a striped background"
    others = ["a blue circle growing on a dark background", "a green triangle moving up",
              "a yellow square shrinking on a striped background"]
    alone = generate(model, [prompt], seed=11, steps=2, progress=False)
    # clip i of a batch uses the seed seed + i: put the prompt at index 2 with seed 9
    batch = generate(model, others[:2] + [prompt] + others[2:], seed=9, steps=2, progress=False)
    assert torch.equal(batch.initial_noise[2:3], alone.initial_noise)
    assert torch.equal(batch.latents[2:3], alone.latents)
    assert torch.equal(batch.videos[2:3], alone.videos)


# --------------------------------------------------------------------------- GPU (skipped without CUDA)
_GPU = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                          reason="needs an FP8-capable CUDA GPU (sm89+) with triton")


def _check_fp8_backend(auto_scale: str, a_bits: int, device: str) -> None:
    m = _layer(auto_scale, a_bits, 128, "fp8", k=256)     # per_block: two 128-channel blocks
    m.scale_block = 128
    m.to(device)
    x = _samples(1, 1000, 256).to(device, torch.bfloat16)
    with torch.no_grad():
        alone = m(x)
        for batch, pos in ((2, 1), (7, 3), (40, 39)):
            got = _in_batch(lambda xb: m(xb.to(device, torch.bfloat16)), x.cpu(), batch, pos, seed=batch)
            assert torch.equal(got, alone), (batch, pos)


FP8_CASES = [("none", 4), ("none", 8), ("per_block", 4), ("per_block", 8), ("per_channel", 4), ("per_channel", 8)]


@pytest.mark.parametrize("auto_scale,a_bits", FP8_CASES)
def test_fp8_backend_on_cpu_falls_back_per_sample(auto_scale, a_bits):
    """The same check as the GPU test below; on a CPU the fp8 backend runs the emulated path."""
    _check_fp8_backend(auto_scale, a_bits, "cpu")


@pytest.mark.gpu
@_GPU
@pytest.mark.parametrize("auto_scale,a_bits", FP8_CASES)
def test_gpu_paths_sample_alone_equals_its_slice(auto_scale, a_bits):
    """fp8 backend: per-token / per-block scales and the exact integer GEMMs (INT8, FP8 for A4);
    per_channel falls back to the emulated path (per-sample Λ_t, one cuBLAS GEMM per sample)."""
    pytest.importorskip("triton")
    _check_fp8_backend(auto_scale, a_bits, "cuda")


@pytest.mark.gpu
@_GPU
def test_gpu_triton_attention_is_per_batch_element():
    pytest.importorskip("triton")
    from dvdquant.kernels.attention_triton import quant_attention
    g = torch.Generator().manual_seed(0)
    B, Lq, Lk, H, D = 5, 300, 700, 4, 128
    q, k, v = (torch.randn(B, n, H, D, generator=g).cuda().to(torch.bfloat16) for n in (Lq, Lk, Lk))
    k = k + torch.arange(B, device="cuda", dtype=torch.bfloat16).view(B, 1, 1, 1)
    for fmt in ("int8", "fp8"):
        full, lse = quant_attention(q, k, v, qk_format=fmt, return_lse=True)
        for i in (0, 3):
            one, lse1 = quant_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], qk_format=fmt, return_lse=True)
            assert torch.equal(full[i:i + 1], one) and torch.equal(lse[i:i + 1], lse1), (fmt, i)
