"""int4 GEMV (weight-only W4A16 linears at M ≤ 16) vs its fp32 torch reference.

The kernel checks run in Triton's CPU interpreter in a fresh subprocess (``TRITON_INTERPRET=1``
must be set before triton is first imported; same pattern as ``test_kernels_triton.py``) and the
tests assert on the JSON it prints. Input validation is checked in-process: the launcher raises
``ConfigError`` before any kernel launch, so no GPU or interpreter is needed. One GPU test
(``-m gpu``) runs the real HunyuanVideo modulation shape.

Tolerances: kernel and reference both accumulate in fp32 but in different orders, so
* fp32 output: relative L2 error ≤ 1e-5;
* bf16 output: every element within one bf16 ulp of the reference's bf16 (or, near zero, within
  1e-5 of the output's max magnitude), i.e. only the final rounding may differ. In the
  interpreter that happens often: Triton 3.9's interpreter *truncates* fp32 → bf16 (its cast
  ignores the round-to-nearest-even that the GPU's ``cvt.rn.bf16.f32`` does), so about half the
  elements are one ulp low; on a GPU only ties near a rounding boundary differ;
* GPU, real shape, bf16 output: relative L2 ≤ 1e-3.
"""
from __future__ import annotations


import pytest
from interpreter import checks_fixture, main
import torch



def _bf16_ulp_ok(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """Each bf16 element at most one ulp (adjacent bit patterns) from the reference, or near zero."""
    def ordered(t):
        u = t.view(torch.int16).to(torch.int32)
        return torch.where(u < 0, -(u & 0x7FFF), u)
    steps = (ordered(y) - ordered(ref)).abs()
    near_zero = (y.float() - ref.float()).abs() <= 1e-5 * ref.float().abs().max()
    return bool(((steps <= 1) | near_zero).all())


def _rel_l2(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _weights(n: int, k: int, g: torch.Generator):
    from dvdquant.numerics.packing import pack_int4

    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    z = torch.randint(0, 16, (n, 1), generator=g).float()
    z[0] = 0.0                                        # extreme zero points: q − z spans [−15, 15]
    z[-1] = 15.0
    s = torch.rand(n, 1, generator=g) * 0.02 + 1e-3
    return pack_int4(q), z, s


def _checks() -> dict:
    from dvdquant.kernels.int4_gemv import int4_linear_reference, int4_linear_small_m

    res = {}
    g = torch.Generator().manual_seed(0)
    i = 0
    for m in (1, 2, 3, 16):
        for k in (32, 96, 256):
            for n in (16, 40):
                p, z, s = _weights(n, k, g)
                for dtype in (torch.bfloat16, torch.float16, torch.float32):
                    # SiLU-like inputs (positive mean) with a per-channel spread
                    x = (torch.nn.functional.silu(torch.randn(m, k, generator=g) * 2)
                         * (torch.rand(k, generator=g) * 4 + 0.1)).to(dtype)
                    bias = torch.randn(n, generator=g).to(dtype) if i % 2 else None
                    i += 1
                    tag = f"M{m}-K{k}-N{n}-{str(dtype)[6:]}-bias{bias is not None}"
                    y = int4_linear_small_m(x, p, z, s, bias, out_dtype=torch.float32)
                    r = int4_linear_reference(x, p, z, s, bias, out_dtype=torch.float32)
                    rel = _rel_l2(y, r)
                    res[f"fp32out-{tag}"] = [y.shape == (m, n) and rel <= 1e-5, f"rel={rel:.1e}"]
                    y = int4_linear_small_m(x, p, z, s, bias, out_dtype=torch.bfloat16)
                    r = int4_linear_reference(x, p, z, s, bias, out_dtype=torch.bfloat16)
                    res[f"bf16out-{tag}"] = [y.dtype == torch.bfloat16 and _bf16_ulp_ok(y, r),
                                             f"rel={_rel_l2(y, r):.1e}"]
    res.update(_layout_checks(g))
    res.update(_module_checks())
    return res


def _module_checks() -> dict:
    """A weight-only QuantLinear through ``dvdquant::w4a16_linear`` (the plan's ``int4_gemv`` path):
    equal to the emulated path to fp32 rounding, for M ≤ MAX_M (GEMV) and M > MAX_M (reference);
    the custom op passes ``opcheck``; torch.compile(fullgraph) traces it as one op."""
    import torch.nn as nn

    from dvdquant.kernels.weight_only import w4a16_linear, weight_only_linear
    from dvdquant.nn import QuantLinear, RuntimeState
    from dvdquant.nn.execution import emulated_forward
    from dvdquant.numerics import grids

    res = {}
    g = torch.Generator().manual_seed(4)
    lin = nn.Linear(96, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 96, generator=g) * 0.05)
    m = QuantLinear.from_params(lin, grids.quantize_weight_minmax(lin.weight.detach(), 4), a_bits=16)
    m.state = RuntimeState()

    def weight_only_forward(layer, x):
        return weight_only_linear(x, layer.qweight, layer.w_zero, layer.w_scale, layer.bias)

    for rows in (2, 40):                                   # GEMV, then the M > MAX_M reference
        x = torch.randn(rows, 96, generator=g)
        y, ref = weight_only_forward(m, x), emulated_forward(m, x)
        exact = torch.equal(y, ref)
        rel = _rel_l2(y, ref)
        res[f"module-M{rows}"] = [y.dtype == x.dtype and (rel <= 1e-6 if rows <= 16 else exact), f"rel={rel:.1e}"]
    x = torch.randn(3, 96, generator=g).to(torch.bfloat16)
    try:
        torch.library.opcheck(w4a16_linear, (x, m.qweight, m.w_zero, m.w_scale, m.bias))
        res["w4a16-opcheck"] = [True, ""]
    except Exception as e:  # noqa: BLE001 - reported as a failed check with its message
        res["w4a16-opcheck"] = [False, f"{type(e).__name__}: {str(e)[:300]}"]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda t: weight_only_forward(m, t), fullgraph=True, backend=backend)
    res["w4a16-compile"] = [torch.equal(compiled(x), weight_only_forward(m, x)) and len(graphs) == 1,
                            f"graphs={len(graphs)}"]
    return res


def _layout_checks(g: torch.Generator) -> dict:
    """Default output dtypes, a strided x, a K loop of several masked steps, M = 0."""
    from dvdquant.kernels.int4_gemv import int4_linear_reference, int4_linear_small_m

    res = {}
    p, z, s = _weights(40, 96, g)
    b = torch.randn(40, generator=g)
    for dtype, want in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                        (torch.float32, torch.bfloat16)):
        y = int4_linear_small_m(torch.randn(2, 96, generator=g).to(dtype), p, z, s, b)
        res[f"default-out-{str(dtype)[6:]}"] = [y.dtype == want, str(y.dtype)]
    wide = torch.randn(3, 160, generator=g)
    x = wide[:, 32:128]                                   # row stride 160, unit stride in K
    for cfg in ({}, {"block_n": 16, "block_k": 32, "num_warps": 2, "num_stages": 1}):   # 3 K steps + ragged N
        y = int4_linear_small_m(x, p, z, s, b, out_dtype=torch.float32, **cfg)
        rel = _rel_l2(y, int4_linear_reference(x, p, z, s, b, out_dtype=torch.float32))
        res[f"strided-x-cfg{cfg.get('block_k', 'default')}"] = [rel <= 1e-5, f"rel={rel:.1e}"]
    y = int4_linear_small_m(torch.empty(0, 96), p, z, s, b)
    res["empty-M0"] = [y.shape == (0, 40), str(tuple(y.shape))]
    return res


results = checks_fixture(__file__)


def test_fp32_output_matches_reference(results):
    got = {k: v for k, v in results.items() if k.startswith("fp32out-")}
    bad = {k: v for k, v in got.items() if not v[0]}
    assert len(got) == 72 and not bad, bad


def test_bf16_output_within_one_ulp(results):
    got = {k: v for k, v in results.items() if k.startswith("bf16out-")}
    bad = {k: v for k, v in got.items() if not v[0]}
    assert len(got) == 72 and not bad, bad


def test_weight_only_module_op(results):
    bad = {k: v for k, v in results.items() if k.startswith(("module-", "w4a16-")) and not v[0]}
    assert len([k for k in results if k.startswith(("module-", "w4a16-"))]) == 4 and not bad, bad


def test_layouts_and_default_dtypes(results):
    got = {k: v for k, v in results.items() if k.startswith(("default-out-", "strided-x-", "empty-"))}
    bad = {k: v for k, v in got.items() if not v[0]}
    assert len(got) == 6 and not bad, bad


@pytest.mark.parametrize("case", ["M>MAX_M", "x int", "x 3-D", "packed int8", "K mismatch", "zero count",
                                  "scale count", "bias count", "out int", "block_k odd", "block_n 3"])
def test_validation_raises_config_error(case):
    pytest.importorskip("triton")
    from dvdquant.errors import ConfigError
    from dvdquant.kernels.int4_gemv import MAX_M, int4_linear_small_m

    n, k = 8, 32
    args = dict(x2=torch.randn(2, k), packed=torch.zeros(n, k // 2, dtype=torch.uint8),
                zero=torch.zeros(n, 1), w_scale=torch.ones(n, 1))
    bad = {"M>MAX_M": dict(x2=torch.randn(MAX_M + 1, k)), "x int": dict(x2=torch.ones(2, k, dtype=torch.int32)),
           "x 3-D": dict(x2=torch.randn(1, 2, k)), "packed int8": dict(packed=torch.zeros(n, k // 2, dtype=torch.int8)),
           "K mismatch": dict(x2=torch.randn(2, k + 2)), "zero count": dict(zero=torch.zeros(n + 1, 1)),
           "scale count": dict(w_scale=torch.ones(n - 1)), "bias count": dict(bias=torch.zeros(n + 1)),
           "out int": dict(out_dtype=torch.int8), "block_k odd": dict(block_k=24), "block_n 3": dict(block_n=3)}
    with pytest.raises(ConfigError):
        int4_linear_small_m(**{**args, **bad[case]})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 2])
def test_gpu_hunyuan_modulation_shape(m):
    from dvdquant.kernels.int4_gemv import int4_linear_reference, int4_linear_small_m

    n, k, dev = 18432, 3072, "cuda"
    g = torch.Generator(device=dev).manual_seed(m)
    packed = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8, generator=g)
    zero = torch.randint(0, 16, (n, 1), device=dev, generator=g).float()
    w_scale = torch.rand(n, 1, device=dev, generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, device=dev, generator=g).to(torch.bfloat16)
    x = torch.nn.functional.silu(torch.randn(m, k, device=dev, generator=g) * 2).to(torch.bfloat16)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False          # an fp32 reference, not TF32
    try:
        ref = int4_linear_reference(x, packed, zero, w_scale, bias)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    y = int4_linear_small_m(x, packed, zero, w_scale, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert _rel_l2(y, ref) <= 1e-3


if __name__ == "__main__":
    main(_checks)
