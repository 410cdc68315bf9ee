"""Issue #2 acceptance on the synthetic-outlier protocol of ``benchmarks/sqnr_outliers.py`` (CPU).

A reduced case (tiny Wan with one block, hidden 256, 4 compensated ×25…×100 channel outliers,
3 timesteps, one seed) and only the inequalities that held with a margin at every seed and on
both models of the full benchmark (docs/RESULTS.md, "Synthetic outliers"). Margins are in dB.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import sqnr_outliers as bench  # noqa: E402

import dvdquant  # noqa: E402


@pytest.fixture(scope="module")
def sqnr():
    torch.manual_seed(0)
    case = bench.make_case("wan", seed=0, outliers=True, layers=1)
    cfgs = bench.methods(4)
    names = {"minmax": "MinMax", "smoothquant": "SmoothQuant (α=0.5, calibrated)", "quarot": "QuaRot (RTN)",
             "dvd_paper": "DVD-Quant, paper ARQ (BGR + rotate→Λ_t per channel)",
             "dvd": "DVD-Quant + dynamic smoothing (chosen variant)"}
    return {k: bench.sqnr_of(case, cfgs[v]) for k, v in names.items()}


# QuaRot ≥ MinMax is *not* asserted: it failed on HunyuanVideo at one seed of three (docs/RESULTS.md).


def test_dvdquant_beats_quarot_and_minmax(sqnr):
    assert sqnr["dvd"] > sqnr["quarot"] + 5.0, sqnr
    assert sqnr["dvd"] > sqnr["minmax"] + 5.0, sqnr


def test_dvdquant_beats_smoothquant(sqnr):
    assert sqnr["dvd"] > sqnr["smoothquant"] + 0.5, sqnr


def test_paper_arq_rotation_first_cannot_undo_channel_outliers(sqnr):
    # the structural finding: rotating first spreads the outlier before Λ_t can act
    assert sqnr["dvd_paper"] < sqnr["smoothquant"] - 3.0, sqnr


def test_dynamic_smoothing_is_exact_reference():
    """Dynamic smoothing: forward equals x/s·H quantized against Q(W·diag(s)·H), s from these tokens
    (activations and the re-quantized weight both rotated by the exact rotation)."""
    from dvdquant.numerics import grids
    from dvdquant.numerics.hadamard import hadamard_rotate_exact
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    model = torch.nn.Sequential(lin)
    dvdquant.quantize_(model, dvdquant.DVDQuantConfig(smoothing="dynamic", smooth_master_bits=16),
                       filter_fn=lambda m, n: True)
    q = model[0]
    x = torch.randn(10, 64)
    x[:, 3] *= 50
    s = x.abs().amax(0).pow(0.5) / lin.weight.abs().amax(0).pow(0.5)
    xr = hadamard_rotate_exact(x / s, 64)
    lam = xr.abs().amax(0, keepdim=True)
    xq = grids.fake_quant_act_per_token_int(xr / lam, 4) * lam
    w = grids.dequantize_weight(grids.quantize_weight_minmax(hadamard_rotate_exact(lin.weight.float() * s, 64), 4))
    y = q(x)
    torch.testing.assert_close(y, xq @ w.t() + lin.bias, rtol=1e-5, atol=1e-5)
    dvdquant.set_backend(q, "emulated")                # no kernel: every backend runs this simulated path
    assert torch.equal(q(x), y)
