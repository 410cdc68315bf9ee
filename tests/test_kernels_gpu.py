"""FP8 path on a real GPU (sm90): kernels vs torch references, and the whole layer vs emulated.

Skipped cleanly without CUDA (``pytest -m gpu`` selects them on the device machine).
Tolerances: quantize-only, fused rotation (the snapped, exact rotation) and expansion
bit-exact; A4 layers with per-token scales **bit-identical** to the emulated path (exact integer
GEMM, the epilogue order of cuBLAS); other layer outputs (A8 e4m3, per-block scales) within 1e-2
relative L2 of an fp32 reference that uses the same activation grid.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                                 reason="needs an FP8-capable GPU (sm89+)")]

DEV = "cuda"


def _data(m, k, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(m, k, device=DEV, generator=g) * (torch.rand(k, device=DEV, generator=g) * 5 + 0.1)
    x[1] = 0
    x[2, :6] = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -2.5])  # int ties for the A4 grid
    x[3, :4] = torch.tensor([448.0, 9.5, -1e-4, -0.0])  # an e4m3 tie and negative zeros (fp8 grid)
    return x.to(dtype)


def _steps(a, b):
    def ordered(t):
        u = t.view(torch.uint8).to(torch.int32)
        return torch.where(u >= 128, -(u & 0x7F), u & 0x7F)
    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt,bits", [("int", 4), ("fp8", 8)])
@pytest.mark.parametrize("block", [None, 128])
@pytest.mark.parametrize("smooth_on", [False, True])
def test_act_quant_exact(dtype, fmt, bits, block, smooth_on):
    from dvdquant.kernels.triton_act_quant import act_quant, act_quant_reference
    x = _data(1000, 3072, dtype)
    smooth = torch.rand(3072, device=DEV) + 0.5 if smooth_on else None
    c, s = act_quant(x, bits=bits, fmt=fmt, smooth=smooth, block=block, scales_k_major=block is not None)
    cr, sr = act_quant_reference(x, bits=bits, fmt=fmt, smooth=smooth, block=block)
    assert torch.equal(c.view(torch.uint8), cr.view(torch.uint8))
    assert torch.equal(s.contiguous(), sr)


@pytest.mark.parametrize("dtype,smooth_on", [(torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True),
                                             (torch.float16, False)])
@pytest.mark.parametrize("fmt,bits", [("int", 4), ("fp8", 8)])
@pytest.mark.parametrize("r,block", [(128, None), (128, 128), (64, 128), (16, None)])
def test_act_quant_rotated(dtype, smooth_on, fmt, bits, r, block):
    """Fused rotation on the tensor cores == the torch reference, bit for bit, also on rows whose
    entries span 15 decades (where an unsnapped fp32 sum would round per summation order)."""
    from dvdquant.kernels.triton_act_quant import act_quant, act_quant_reference
    from dvdquant.numerics.hadamard import hadamard_matrix
    x = _data(1000, 3072, dtype, seed=1)
    g = torch.Generator(device=DEV).manual_seed(2)
    x[4:40] = (torch.randn(36, 3072, device=DEV, generator=g) * torch.logspace(-12, 3, 3072, device=DEV)).to(dtype)
    smooth = torch.rand(3072, device=DEV) + 0.5 if smooth_on else None
    h = hadamard_matrix(r, device=DEV)
    c, s = act_quant(x, bits=bits, fmt=fmt, smooth=smooth, h_block=h, block=block)
    cr, sr = act_quant_reference(x, bits=bits, fmt=fmt, smooth=smooth, h_block=h, block=block)
    d = _steps(c, cr) if fmt == "fp8" else (c.float() - cr.float()).abs()   # int: code difference
    print(f"rotated R={r} block={block} {fmt}{bits} {dtype} smooth={smooth_on}: max={int(d.max())} "
          f"frac={float((d > 0).float().mean()):.2e}")
    assert torch.equal(c.view(torch.uint8), cr.view(torch.uint8))
    assert torch.equal(s.contiguous(), sr)


def test_fma_division_is_correctly_rounded():
    """quant_jit.quantize_codes_recip's quotient (RN(x·r) + one fma correction, r = RN(1/s)) equals IEEE
    div.rn on 2^26 random pairs over the range recip_ok admits, and on quotients within 3 ulps of the
    int grid's ties and of every e4m3 rounding midpoint."""
    import triton
    from dvdquant.kernels.quant_jit import fma_div_probe_kernel
    g = torch.Generator(device=DEV).manual_seed(5)
    n = 1 << 26
    s = torch.exp2(torch.rand(n, device=DEV, generator=g) * 198 - 99)               # 2^-99 … 2^99
    q = torch.rand(n, device=DEV, generator=g) * 896 - 448                          # |x/s| ≤ 448 (e4m3 max)
    # near-ties: k + 1/2 (int grid) and e4m3 midpoints, nudged by −3 … +3 ulps
    e4m3 = torch.arange(0, 127, device=DEV, dtype=torch.uint8).view(torch.float8_e4m3fn).float()   # 0 … 448
    e4m3_mids = (e4m3[:-1] + e4m3[1:]) / 2
    mids = torch.cat([torch.arange(-128, 128, device=DEV) + 0.5, e4m3_mids, -e4m3_mids])
    near = mids.repeat(n // (7 * mids.numel()) + 1)[: n // 7]
    nudge = torch.randint(-3, 4, near.shape, device=DEV, generator=g, dtype=torch.int32)
    near = (near.view(torch.int32) + nudge).view(torch.float32)
    q[: near.numel()] = near
    x = q * s                                                                        # x/s within ulps of q
    out = torch.empty(2 * n, device=DEV)
    fma_div_probe_kernel[(triton.cdiv(n, 1024),)](x, s, out, n, BLOCK=1024)
    ref, fma = out[:n], out[n:]
    bad = (ref.view(torch.int32) != fma.view(torch.int32)).sum().item()
    assert bad == 0, f"{bad} of {n} quotients differ from div.rn"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt,bits,codes", [("int", 4, torch.float8_e4m3fn), ("fp8", 8, torch.float8_e4m3fn),
                                            ("int", 8, torch.int8)])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("cfg", [{"fma_div": True}, {"fma_div": True, "reverse": True},
                                 {"fma_div": False, "num_warps": 8},
                                 {"fma_div": False, "reverse": True, "evict1": "evict_last", "evict2": "evict_first"}])
def test_act_quant_second_pass_variants_are_exact(dtype, fmt, bits, codes, rotate, cfg):
    """The second-pass variants (fma division — the default —, div.rn, backwards walk, eviction hints) give the reference's codes
    and scales, bit for bit, on tie rows, zero rows, tiny rows (where the fma division is not allowed and
    the program falls back to div_rn) and rows spanning 15 decades."""
    from dvdquant.kernels.triton_act_quant import act_quant, act_quant_reference
    from dvdquant.numerics.hadamard import hadamard_matrix
    x = _data(4000, 3072, dtype, seed=3)
    g = torch.Generator(device=DEV).manual_seed(4)
    x[4:40] = (torch.randn(36, 3072, device=DEV, generator=g) * torch.logspace(-12, 3, 3072, device=DEV)).to(dtype)
    x[100:110] = x[2:3].float() * torch.rand(10, 1, device=DEV, generator=g).to(dtype) * 10   # scaled tie rows
    if dtype == torch.float32:
        x[200:202] = 1e-36                                                                     # scales below 2^-100
    h = hadamard_matrix(128, device=DEV) if rotate else None
    c, s = act_quant(x, bits=bits, fmt=fmt, h_block=h, config=cfg, codes_dtype=codes)
    cr, sr = act_quant_reference(x, bits=bits, fmt=fmt, h_block=h, codes_dtype=codes)
    assert torch.equal(c.view(torch.uint8), cr.view(torch.uint8))
    assert torch.equal(s, sr)


def test_expand_exact():
    from dvdquant.kernels.expand import expand_int4_to_fp8, expand_reference
    from dvdquant.numerics.packing import pack_int4
    q = torch.randint(0, 16, (3072, 5120), device=DEV, dtype=torch.uint8)
    z = torch.randint(0, 16, (3072, 1), device=DEV).float()
    p = pack_int4(q)
    assert torch.equal(expand_int4_to_fp8(p, z).view(torch.uint8), expand_reference(p, z).view(torch.uint8))


def _int_codes_through_scaled_mm(a: torch.Tensor, w: torch.Tensor, fast_accum: bool):
    """(fp32 ``_scaled_mm`` of integer codes a (M, K) · w (N, K)ᵀ as e4m3 with unit scales, float64 reference)."""
    one_a, one_b = torch.ones(a.shape[0], 1, device=DEV), torch.ones(1, w.shape[0], device=DEV)
    y = torch._scaled_mm(a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn).t(), scale_a=one_a, scale_b=one_b,
                         out_dtype=torch.float32, use_fast_accum=fast_accum)
    return y.double(), a.double() @ w.double().t()


def test_int4_codes_exact_through_scaled_mm():
    a = torch.randint(-7, 8, (2048, 12288), device=DEV)
    w = torch.randint(-15, 16, (1024, 12288), device=DEV)
    y, ref = _int_codes_through_scaled_mm(a, w, fast_accum=False)
    assert float((y - ref).abs().max()) == 0.0


@pytest.mark.parametrize("k", [3072, 15360, 30720])
def test_fast_accum_on_mixed_sign_int_codes_within_bound(k):
    """Fast FP8 accumulation is *not* exact on int-grid codes: Hopper's accumulator drops low bits
    once the running sums grow (`probe_fast_accum.py`, a removed probe (git history), H100: 22–49 % rel. L2 on same-sign
    data at K ≥ 15360). On zero-mean codes × weights it stays within the issue's per-layer bound;
    that, and nothing more, is what the opt-in ``fast_accum`` promises."""
    g = torch.Generator(device=DEV).manual_seed(k)
    a = torch.randint(-7, 8, (1024, k), device=DEV, generator=g)
    w = torch.randint(-15, 16, (512, k), device=DEV, generator=g)
    y, ref = _int_codes_through_scaled_mm(a, w, fast_accum=True)
    rel = float((y - ref).norm() / ref.norm())
    print(f"fast accum mixed-sign int codes K={k}: rel L2 {rel:.2e}")
    assert rel <= 1e-2


@pytest.mark.parametrize("k", [3072, 12288, 15360])
def test_fast_accum_error_on_rotated_tokens(k, record_property):
    """Opt-in fast FP8 accumulation on A4 codes of rotated (zero-mean) tokens and int4 weights:
    no longer exact, but within the issue's per-layer bound (1e-2) of the exact GEMM; the
    measured error is printed (and reported in docs/results/speed.md)."""
    from dvdquant.kernels.expand import expand_int4_to_fp8
    from dvdquant.kernels.fp8 import gemm_rowwise
    from dvdquant.kernels.triton_act_quant import act_quant
    from dvdquant.numerics.hadamard import hadamard_matrix
    g = torch.Generator(device=DEV).manual_seed(5)
    x = (torch.randn(2048, k, device=DEV, generator=g) + 0.5).to(torch.bfloat16)   # a shared offset, as in DiTs
    q, s = act_quant(x, bits=4, h_block=hadamard_matrix(128, device=DEV))
    p = torch.randint(0, 256, (1024, k // 2), device=DEV, generator=g, dtype=torch.uint8)
    z = torch.randint(5, 11, (1024, 1), device=DEV, generator=g).float()
    w8, ws = expand_int4_to_fp8(p, z), torch.rand(1024, 1, device=DEV, generator=g) * 0.01
    exact = gemm_rowwise(q, s, w8, ws, None, torch.float32)
    fast = gemm_rowwise(q, s, w8, ws, None, torch.float32, fast_accum=True)
    rel = float((fast - exact).norm() / exact.norm())
    print(f"fast accum K={k}: rel L2 {rel:.2e}")
    record_property("rel", rel)
    assert rel <= 1e-2


@pytest.mark.parametrize("m,n,k", [(4096, 3072, 3072), (1000, 5120, 13824), (333, 272, 256), (77, 40, 80)])
@pytest.mark.parametrize("tma", [True, False])
def test_int8_gemm_kernels_equal_the_reference(m, n, k, tma):
    """The Triton INT8 GEMMs (persistent TMA kernel with the default tiles, pointer kernel) give
    :func:`numerics.linear.linear_per_token_per_channel` bit for bit in fp32 and bf16 out, on ragged M/N
    and, for TMA, a K that is no multiple of the 128-wide k tile (read past K as zeros)."""
    from dvdquant.kernels.int8_gemm import DEFAULT_CONFIG, int8_gemm, launch_config
    from dvdquant.numerics.linear import linear_per_token_per_channel
    if not tma and k % 32:
        pytest.skip("the pointer kernel needs a k tile dividing K")
    q = torch.randint(-127, 128, (m, k), device=DEV, dtype=torch.int8)
    w = torch.randint(-15, 16, (n, k), device=DEV, dtype=torch.int8)
    s = torch.rand(m, 1, device=DEV) * 0.1 + 1e-3
    d = torch.rand(n, 1, device=DEV) * 0.01 + 1e-4
    b = torch.randn(n, device=DEV).to(torch.bfloat16)
    cfg = dict(DEFAULT_CONFIG, tma=tma, block_k=next(bk for bk in (128, 64, 32) if k % bk == 0 or tma))
    if tma:
        assert launch_config(q, w)["tma"]                                 # what gemm_int8_rowwise uses on sm90
    ref = linear_per_token_per_channel(q, s, w.float(), d, b, 127 * 15)
    y = int8_gemm(q, s, w, d, b, out_dtype=torch.float32, config=cfg)
    yb = int8_gemm(q, s, w, d, b, out_dtype=torch.bfloat16, config=cfg)
    assert torch.equal(y, ref) and torch.equal(yb, ref.to(torch.bfloat16))


def _layer(k, n, **kw):
    from dvdquant.kernels import ExecutionConfig
    from dvdquant.nn import QuantLinear, RuntimeState
    from dvdquant.numerics import grids
    lin = nn.Linear(k, n, device=DEV)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
        lin.bias.normal_()
    m = QuantLinear.from_params(lin, grids.quantize_weight_minmax(lin.weight.detach(), 4), **kw)
    m.layer_name, m.state = "gpu.test", RuntimeState(execution=ExecutionConfig("fp8"))
    return m


@pytest.mark.parametrize("kw", [dict(), dict(rotation_block=128), dict(rotation_block=3072),
                                dict(rotation_block=128, auto_scale="per_block", scale_block=128),
                                dict(rotation_block=64, auto_scale="per_block", scale_block=128),
                                dict(a8_format="fp8_e4m3", rotation_block=128)])
def test_fp8_layer_matches_reference(kw):
    from dvdquant.nn.execution import dequantized_weight, plan, quantize_activations
    m = _layer(3072, 1536, a_bits=4, **kw)
    x = torch.randn(4, 1000, 3072, device=DEV, dtype=torch.bfloat16) * 3
    for bits in (4, 8, 4):                                       # δ-GBS: switch at run time
        m.state.a_bits = bits
        p = plan(m, x.device, bits)
        assert p.path == "fp8", p.reason
        y = m(x).float().reshape(-1, 1536)
        x2 = m.transform_input(x.reshape(-1, 3072).float())
        ref = quantize_activations(m, x2, bits, p.fmt).dequantize() @ dequantized_weight(m).t() + m.bias
        rel = float((y - ref).norm() / ref.norm())
        print(f"layer {kw} A{bits}: rel L2 vs same-grid fp32 reference = {rel:.2e}")
        assert rel < 1e-2, (bits, rel)


@pytest.mark.parametrize("kw", [dict(), dict(rotation_block=128), dict(rotation_block=64), dict(rotation_block=256),
                                dict(rotation_block=3072), dict(rotation_block=128, auto_scale="per_block", scale_block=3072)])
@pytest.mark.parametrize("m_tokens,bias", [(4000, True), (333, False), (17, True), (8, True)])
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_fp8_int_grid_layer_is_bit_identical_to_emulated(kw, m_tokens, bias, bits):
    """Int-grid activations with per-token scales: the fused (or torch-first) exact rotation gives the
    emulated path's codes; every width runs the Triton INT8 GEMM (``int8_gemm``, the default; A4 on
    sm90) and, with ``int8_gemm=False``, A4 runs ``_scaled_mm`` with exact accumulation — both the exact
    integer GEMM — and the epilogue rounds ((acc · Δ) · s) + b as the emulated path does: equal
    outputs, not close ones."""
    from dvdquant.kernels import ExecutionConfig
    from dvdquant.nn.execution import emulated_forward, plan
    m = _layer(3072, 1536, a_bits=bits, **kw)
    m.bias = nn.Parameter(m.bias.detach().to(torch.bfloat16), requires_grad=False) if bias else None   # a bf16 model
    x = (torch.randn(2, m_tokens, 3072, device=DEV) * torch.logspace(-3, 1, 3072, device=DEV)).to(torch.bfloat16)
    assert plan(m, x.device, bits).path == "fp8"
    for int8 in ((True, False) if bits == 4 else (True,)):
        m.state.execution = ExecutionConfig("fp8", int8_gemm=int8)
        with torch.no_grad():
            y, ye = m(x), emulated_forward(m, x)
        print(f"A{bits} int8={int8} {kw} M={2 * m_tokens} bias={bias}: differing {float((y != ye).float().mean()):.2e}")
        assert y.dtype == ye.dtype == torch.bfloat16
        assert torch.equal(y, ye)


def test_compiled_fp8_block_switches_bits_without_recompiling():
    """torch.compile (inductor) of LayerNorm → QuantLinear → GELU → QuantLinear on the fp8 path:
    one graph, equal to eager within bf16 rounding, A4 → A8 → A4 with no recompilation."""
    import torch._dynamo.utils as dutils
    from dvdquant.kernels import ExecutionConfig
    from dvdquant.nn import RuntimeState
    torch._dynamo.reset()
    state = RuntimeState(execution=ExecutionConfig("fp8"))
    l1, l2 = _layer(1024, 2048, a_bits=4, rotation_block=128), _layer(2048, 1024, a_bits=4, rotation_block=128)
    l1.state = l2.state = state
    block = nn.Sequential(nn.LayerNorm(1024, device=DEV, dtype=torch.bfloat16), l1, nn.GELU(approximate="tanh"), l2)
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 4096, 1024, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        for i, bits in enumerate((4, 8, 4, 8)):
            state.a_bits = bits
            ye, yc = block(x).float(), compiled(x).float()
            if i == 1:
                frames = dict(dutils.counters["stats"])
            rel = float((ye - yc).norm() / ye.norm())
            print(f"compiled vs eager A{bits}: rel {rel:.2e}")
            assert rel < 1e-2
    assert dict(dutils.counters["stats"]) == frames


def test_weight_only_layer_keeps_a16_eager_compiled_and_in_the_op():
    """A weight-only (a_bits=16) modulation-shaped layer on the fp8 backend (int4 GEMV path): δ-GBS
    overrides change nothing, eager and compiled (inductor) agree with the emulated A16 path, no recompilation,
    no weight copy kept; the FP8 op called directly also runs A16 (bf16 GEMM) for it."""
    import torch._dynamo.utils as dutils
    from dvdquant.nn.execution import emulated_forward, fp8_forward
    torch._dynamo.reset()
    m = _layer(3072, 18432, a_bits=16)                             # HunyuanVideo norm1.linear shape
    x = torch.randn(2, 3072, device=DEV, dtype=torch.bfloat16)
    ref = emulated_forward(m, x)
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        compiled(x)
        frames, mem = dict(dutils.counters["stats"]), torch.cuda.memory_allocated()
        for bits in (4, 8, None, 4):
            m.state.a_bits = bits
            assert m.current_a_bits() == 16
            rel_e = float((m(x).float() - ref.float()).norm() / ref.float().norm())   # int4 GEMV path
            assert rel_e < 1e-3, (bits, rel_e)
            rel = float((compiled(x).float() - ref.float()).norm() / ref.float().norm())
            assert rel < 1e-3, (bits, rel)
            op = fp8_forward(m, x)                                 # bits from the state: still A16
            rel_op = float((op.float() - ref.float()).norm() / ref.float().norm())
            print(f"weight-only A16 with override {bits}: compiled rel {rel:.2e}, fp8 op rel {rel_op:.2e}")
            assert rel_op < 1e-2, (bits, rel_op)
    assert dict(dutils.counters["stats"]) == frames
    from dvdquant.kernels.fp8 import release_weight_buffers
    release_weight_buffers()                                       # the op's pooled FP8 buffer
    assert torch.cuda.memory_allocated() < mem + 8e6               # a bf16 weight copy would be 113 MB


@pytest.mark.parametrize("model", ["wan", "hunyuan"])
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_projections_equal_unfused(compiled, model):
    """A tiny Wan / HunyuanVideo transformer (bf16, W4A4, then A8 via the runtime state) on the fp8 path: the
    fused Q/K/V and K/V projections (one activation quantization and one GEMM each; HunyuanVideo through
    dvdquant's fused-aware processor) give the unfused model's output bit for bit, eager, and for Wan also
    under torch.compile (HunyuanVideo compiled: within inductor's glue rounding)."""
    pytest.importorskip("diffusers")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    import dvdquant
    from dvdquant.nn.fused import fused_modules
    from tiny_models import tiny_hunyuan, tiny_wan
    torch._dynamo.reset()
    m, inputs = tiny_wan(head_dim=64) if model == "wan" else tiny_hunyuan(head_dim=64)
    dvdquant.quantize_(m, dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, rotation_block=64, attention="none"))
    m = m.to(DEV, torch.bfloat16).eval()
    inputs = {k: (v.to(DEV, torch.bfloat16) if v.is_floating_point() else v.to(DEV)) for k, v in inputs.items()}
    inputs["hidden_states"] = inputs["hidden_states"].repeat(1, 1, 1, 2, 2)      # 512 video tokens
    n_fused = 4 if model == "wan" else 2
    state = dvdquant.get_state(m)
    outs = {}
    with torch.no_grad():
        for fused in (False, True):
            dvdquant.set_backend(m, "fp8", fuse_projections=fused)
            assert len(fused_modules(m)) == (n_fused if fused else 0)
            torch._dynamo.reset()               # one graph per configuration (toggling in one graph recompiles)
            run = torch.compile(m) if compiled else m
            for bits in (4, 8):                 # δ-GBS: the bits change inside one graph
                state.a_bits = bits
                outs[fused, bits] = run(**inputs, return_dict=False)[0]
    for bits in (4, 8):
        ref, out = outs[False, bits], outs[True, bits]
        rel = float((out.float() - ref.float()).norm() / ref.float().norm())
        print(f"{model} compiled={compiled} A{bits}: differing {float((out != ref).float().mean()):.2e}, "
              f"rel. L2 {rel:.1e}")
        if compiled and model == "hunyuan":
            # two different graphs: inductor rounds the glue after the projections (QK-norm, RoPE of the
            # joint sequence) differently. H100: rel. L2 0.22 % fused vs unfused in one run (0 in another), less
            # than compiling alone moves the output (0.83 % compiled vs eager; `probe_fused_compile.py`, a removed probe (git history))
            assert rel < 1e-2
        else:
            assert torch.equal(out, ref)
