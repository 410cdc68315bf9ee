"""Numerics: grids, int4 packing, Hadamard matrices, metrics."""
import math

import pytest
import torch

from dvdquant.errors import ConfigError, NonFiniteError
from dvdquant.numerics import grids, hadamard, metrics, packing

HIDDEN_SIZES = [3072, 5120, 1536, 1920, 2048, 13824, 8960, 12288, 15360, 21504, 4096, 128, 256, 384]


def test_pack_unpack_roundtrip_exact():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (37, 64), generator=g, dtype=torch.uint8)
    packed = packing.pack_int4(codes)
    assert packed.shape == (37, 32) and packed.dtype == torch.uint8
    assert torch.equal(packing.unpack_int4(packed), codes)
    # layout: low nibble = even index
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)


def test_pack_edge_cases():
    for c in (torch.zeros(4, 8, dtype=torch.uint8), torch.full((4, 8), 15, dtype=torch.uint8)):
        assert torch.equal(packing.unpack_int4(packing.pack_int4(c)), c)
    with pytest.raises(ConfigError):
        packing.pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ConfigError):
        packing.pack_int4(torch.full((2, 4), 16, dtype=torch.uint8))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", [1, 7, 8, 63, 256])
def test_pack_bits_roundtrip_and_size(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2 ** bits, (3, 2, k), generator=g).to(torch.uint8)
    packed = packing.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, (k * bits + 7) // 8)
    assert torch.equal(packing.unpack_bits(packed, bits, k), codes)
    if bits == 4 and k % 2 == 0:
        assert torch.equal(packed, packing.pack_int4(codes))          # the int4 layout is the 4-bit stream


def test_pack_bits_layout_and_errors():
    # codes 5, 3, 6 at 3 bits, each LSB first: stream 1,0,1, 1,1,0, 0,1,1 → bytes 0b10011101, 0b1
    assert packing.pack_bits(torch.tensor([5, 3, 6], dtype=torch.uint8), 3).tolist() == [0b10011101, 0b1]
    with pytest.raises(ConfigError, match=r"3-bit codes must lie in \[0, 7\]"):
        packing.pack_bits(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ConfigError, match="1..8 bits"):
        packing.pack_bits(torch.tensor([1], dtype=torch.uint8), 9)
    with pytest.raises(ConfigError, match="take 2 bytes per row"):
        packing.unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 5)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [None, 16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_weight_quantize_dequantize_consistent(bits, group, symmetric):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(bits))
    p = grids.quantize_weight_minmax(w, bits, group, symmetric)
    assert p.codes.dtype == torch.uint8 and int(p.codes.max()) <= 2 ** bits - 1
    assert torch.all(p.zero == torch.round(p.zero))
    wh = grids.dequantize_weight(p)
    # every element lies within half a step of its original (no clipping in MinMax)
    step = p.scale.repeat_interleave(64 // p.scale.shape[1], dim=1)
    assert torch.all((wh - w).abs() <= step * 0.5 + 1e-6)
    # quantizing the dequantized weight again with the same params is the identity
    rows = grids._group_view(wh, group)
    again = grids.weight_codes_from_params(rows, p.scale.reshape(-1, 1), p.zero.reshape(-1, 1), bits)
    assert torch.equal(again.reshape(24, 64).to(torch.uint8), p.codes)


def test_weight_edge_cases():
    w = torch.zeros(3, 8)
    w[1] = 0.5                                        # constant channel
    w[2, 3] = 1e4                                     # huge outlier
    p = grids.quantize_weight_minmax(w, 4)
    wh = grids.dequantize_weight(p)
    assert torch.equal(wh[0], torch.zeros(8))         # zeros stay exact
    assert torch.allclose(wh[1], w[1])                # constant channel exact (0 on grid, c = 15 steps)
    assert wh[2, 3] == pytest.approx(1e4, rel=1e-6)
    bad = torch.randn(4, 8)
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        grids.quantize_weight_minmax(bad, 4)
    with pytest.raises(ConfigError):
        grids.quantize_weight_minmax(torch.randn(4, 10), 4, group_size=4)


def test_int4_weight_codes_exact_in_fp8():
    w = torch.randn(16, 32)
    p = grids.quantize_weight_minmax(w, 4)
    d = p.codes.float() - p.zero
    assert d.abs().max() <= 15
    assert torch.equal(d.to(torch.float8_e4m3fn).float(), d)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_act_per_token(bits):
    x = torch.randn(10, 48) * torch.logspace(-2, 2, 10).unsqueeze(1)
    x[3] = 0
    codes, scale = grids.quantize_act_per_token_int(x, bits)
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == qmax
    assert torch.equal(codes[3], torch.zeros(48, dtype=torch.int8))
    fq = grids.fake_quant_act_per_token_int(x, bits)
    assert torch.all((fq - x).abs() <= scale * 0.5 * (1 + 1e-6))
    with pytest.raises(ConfigError):
        grids.act_qmax(16)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_act_fake_quant_rows_equals_codes_times_scale(bits):
    """fake_quant_act_rows (no clamp when every scale is a normal fp32) gives the bits of the int8 codes
    times their scale, with and without a channel balance, also for rows whose scale is subnormal or 0."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(12, 64, generator=g) * torch.logspace(-3, 3, 12).unsqueeze(1)
    x[2] = 0
    x[5] *= 1e-37                                                   # scale below 2^-126: the clamped path
    x[6] = 2.0 ** -149                                              # amax / qmax underflows to 0
    for lam in (None, torch.rand(1, 64, generator=g) + 0.5):
        xs = x if lam is None else x / lam
        codes, scale = grids.quantize_act_per_token_int(xs, bits)
        want = codes.float() * scale if lam is None else codes.float() * scale * lam
        for rows in (x, x[[0, 1, 3, 4]]):                           # all-normal scales, and mixed
            got = grids.fake_quant_act_rows(rows, bits, "int", lam=lam)
            sel = slice(None) if rows is x else [0, 1, 3, 4]
            assert torch.equal(got, want[sel])


def test_fp8_act_fake_quant_exact_on_grid():
    x = torch.randn(5, 32)
    fq = grids.fake_quant_act_per_token_fp8_e4m3(x)
    assert metrics.relative_error(x, fq) < 0.05
    assert torch.equal(grids.fake_quant_act_per_token_fp8_e4m3(fq), fq) or metrics.relative_error(fq, grids.fake_quant_act_per_token_fp8_e4m3(fq)) < 1e-6


@pytest.mark.parametrize("n", HIDDEN_SIZES)
def test_hadamard_orthogonal(n):
    assert hadamard.can_build_hadamard(n)
    if n > 2048:  # the construction is a Kronecker product: check its factorisation instead of n³ work
        base, pow2 = hadamard._decompose(n)
        h = hadamard.hadamard_matrix(base, torch.float64)
        assert torch.allclose(h @ h.T, torch.eye(base, dtype=torch.float64), atol=1e-10)
        return
    h = hadamard.hadamard_matrix(n, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5))


def test_hadamard_unbuildable_and_blocks():
    assert not hadamard.can_build_hadamard(52)
    with pytest.raises(ConfigError):
        hadamard.hadamard_matrix(52)
    assert hadamard.largest_hadamard_block(52) == 4
    x = torch.randn(3, 256, dtype=torch.float64)
    hb = hadamard.hadamard_matrix(128, torch.float64)
    y = hadamard.rotate_last_dim(x, hb)
    assert torch.allclose(y, x @ hadamard.block_hadamard(256, 128, torch.float64))
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1))


def test_metrics():
    a = torch.randn(100)
    assert metrics.sqnr_db(a, a) == math.inf
    assert metrics.sqnr_db(a, a + 0.1 * a) == pytest.approx(20.0, abs=1e-6)
    assert metrics.relative_error(a, 1.1 * a) == pytest.approx(0.1, abs=1e-6)


# ------------------------------------------------------------------ exact online rotation
def _wide_tokens(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g) * torch.logspace(-8, 3, n)[torch.randperm(n, generator=g)]
    x[0] = 0.0
    x[1, :7] = torch.tensor([1e-30, -2.5e-38, 65504.0, 3e5, -1e-3, 7.0, 0.5])
    return x


@pytest.mark.parametrize("block", [16, 128, 256, 3072, 12, 20])
def test_rotation_snap_grid_and_bound(block):
    """snap: every entry an integer multiple of u = 2^(e_max − 14) with |x'/u| ≤ 2^15, error ≤ u/2."""
    x = _wide_tokens(9, block * 2)
    xs = hadamard.snap_to_rotation_grid(x, block)
    seg, segs = x.reshape(9, -1, block), xs.reshape(9, -1, block)
    amax = seg.abs().amax(-1, keepdim=True)
    e = torch.floor(torch.log2(amax.clamp_min(2.0 ** -112)))
    u = torch.exp2(e - 14).clamp_min(2.0 ** -126)
    k = segs.double() / u.double()
    assert torch.equal(k, torch.round(k)) and float(k.abs().max()) <= 2 ** 15
    assert bool(((segs - seg).abs() <= u / 2).all())


@pytest.mark.parametrize("block", [16, 128])
def test_snapped_values_are_two_bf16_parts(block):
    """The kernels' rotation of snapped fp32 tiles (ROT_MODE 2) feeds the tensor cores hi = bf16(x') and
    mid = bf16(x' − hi): exact, i.e. hi + mid == x' for every snapped entry (module doc of
    kernels.triton_act_quant), on wide-range tokens and on tokens divided by smoothing factors."""
    x = _wide_tokens(9, block * 4)
    smooth = torch.rand(block * 4, generator=torch.Generator().manual_seed(3)) * 7 + 0.01
    for t in (x, x / smooth, torch.randn(64, block * 4) * 2.0 ** 100):
        xs = hadamard.snap_to_rotation_grid(t, block)
        hi = xs.bfloat16().float()
        r1 = xs - hi
        assert torch.equal(r1.bfloat16().float(), r1) and torch.equal(hi + r1, xs)


@pytest.mark.parametrize("block", [16, 64, 128, 256, 1024, 3072, 5120, 12])
def test_rotation_exact_is_order_independent(block):
    """The same bits from the factorised fp32 path, the fp64 path (TF32 / reduced precision set) and a
    dense fp64 ±1 matmul; within 2^-14 of the block's max of the plain fp64 rotation."""
    x = _wide_tokens(11, block * 2, seed=block).to(torch.bfloat16).float()
    a = hadamard.hadamard_rotate_exact(x, block)
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")            # forces the fp64 stages
        b = hadamard.hadamard_rotate_exact(x, block)
    finally:
        torch.set_float32_matmul_precision(prev)
    c = hadamard.rotate_pm1_exact(x, hadamard.hadamard_matrix(block))
    assert a.dtype == torch.float32 and torch.equal(a, b) and torch.equal(a, c)
    ref = hadamard.hadamard_rotate(x.double(), block)
    tol = x.reshape(11, -1, block).abs().amax(-1, keepdim=True).double() * 2.0 ** -14 * 1.01 + 1e-30
    assert bool(((a.double() - ref).reshape(11, -1, block).abs() <= tol).all())


def test_rotation_exact_keeps_nonfinite_and_checks_block():
    x = torch.ones(3, 64)
    x[1, 3], x[2, 9] = float("nan"), float("inf")
    y = hadamard.hadamard_rotate_exact(x, 64)
    assert bool(torch.isfinite(y[0]).all()) and not bool(torch.isfinite(y[1]).any()) and not bool(
        torch.isfinite(y[2]).all())
    with pytest.raises(ConfigError, match="does not divide"):
        hadamard.hadamard_rotate_exact(torch.ones(2, 96), 64)


# ------------------------------------------------------------------ exact code GEMM + epilogue order
@pytest.mark.parametrize("k,codes_max", [(3072, 7), (15360, 7), (4096, 127), (12288, 127)])
def test_exact_code_matmul_matches_fp64(k, codes_max):
    from dvdquant.numerics.linear import exact_code_matmul
    g = torch.Generator().manual_seed(k)
    c = torch.randint(-codes_max, codes_max + 1, (6, k), generator=g).to(torch.int8)
    c[0] = codes_max                                          # same-sign worst case
    w = torch.randint(-15, 16, (5, k), generator=g).float()
    w[0] = 15.0
    acc = exact_code_matmul(c, w, codes_max * 15)
    ref = (c.double() @ w.double().t()).float()                # exact in fp64, one rounding
    assert acc.dtype == torch.float32 and torch.equal(acc, ref)


def test_linear_per_token_per_channel_order():
    """((acc · Δ) · s) + b, each step rounded in fp32: the FP8 GEMM's epilogue
    (docs/results/speed.md, "Numerics: fp8 path vs emulated")."""
    from dvdquant.numerics.linear import linear_per_token_per_channel
    g = torch.Generator().manual_seed(1)
    c = torch.randint(-7, 8, (33, 256), generator=g).to(torch.int8)
    w = torch.randint(-15, 16, (40, 256), generator=g).float()
    s, d = torch.rand(33, 1, generator=g) + 0.01, torch.rand(40, 1, generator=g) * 1e-2
    b = torch.randn(40, generator=g).to(torch.bfloat16)
    y = linear_per_token_per_channel(c, s, w, d, b, 7 * 15)
    acc = (c.double() @ w.double().t()).float()
    assert torch.equal(y, ((acc * d.t()) * s) + b.float())
    assert torch.equal(linear_per_token_per_channel(c, s, w, d, None, None), (acc * d.t()) * s)
