"""The dynamic-smoothing weight kernel (:mod:`dvdquant.kernels.weight_requant`) vs its torch reference, in
Triton's CPU interpreter (a subprocess: ``tests/interpreter.py``). Tolerance: none — codes and steps bit-equal.
"""
from __future__ import annotations

from interpreter import checks_fixture, main


def _master(n, k, g, zero_col=True):
    import torch
    w = torch.randn(n, k, generator=g) * (torch.rand(k, generator=g) * 3 + 0.05)
    w[:, 3] *= 30.0                                               # an outlier column
    if zero_col:
        w[:, 5] = 0.0                                             # a zero column: colmax floored at 1e-12
    w[2] = 0.0                                                    # an all-zero row: Δ = 1
    colmax = w.abs().amax(dim=0)
    wn = w / colmax.clamp_min(1e-12)
    scale = (wn.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
    return torch.clamp(torch.round(wn / scale), -127, 127).to(torch.int8), scale, colmax


def _checks() -> dict:
    import torch

    from dvdquant.errors import ConfigError, NonFiniteError
    from dvdquant.kernels.emulated import requant_weight_reference
    from dvdquant.kernels.finite import CLEAN
    from dvdquant.kernels.weight_requant import requant_weight

    res = {}
    g = torch.Generator().manual_seed(0)
    for n, k, r in ((40, 128, 64), (33, 256, 128), (40, 128, 16), (24, 96, None), (16, 64, 64)):
        m, sc, cm = _master(n, k, g)
        s = torch.rand(3, k, generator=g) * 4 + 0.01
        s[1, ::7] = 1.0
        s[2] *= torch.logspace(-6, 6, k)                          # 12 decades across one row
        for bits, sym, dt in ((4, False, torch.int8), (4, True, torch.int8), (4, False, torch.float8_e4m3fn),
                              (4, True, torch.float8_e4m3fn), (3, False, torch.int8), (7, False, torch.int8)):
            w8, d = requant_weight(m, sc, cm, s, bits=bits, symmetric=sym, rotation_block=r, codes_dtype=dt)
            wr, dr = requant_weight_reference(m, sc, cm, s, bits=bits, symmetric=sym, rotation_block=r,
                                              codes_dtype=dt)
            ok = torch.equal(w8.view(torch.uint8), wr.view(torch.uint8)) and torch.equal(d, dr)
            diff = int((w8.float() != wr.float()).sum())
            res[f"exact-N{n}-K{k}-R{r}-W{bits}-sym{sym}-{str(dt)[6:]}"] = [ok, f"codes differing={diff}"]
        one, d1 = requant_weight(m, sc, cm, s[1:2], bits=4, symmetric=False, rotation_block=r)
        all3, d3 = requant_weight(m, sc, cm, s, bits=4, symmetric=False, rotation_block=r)
        res[f"sample-alone-N{n}-K{k}-R{r}"] = [torch.equal(one, all3[n:2 * n]) and torch.equal(d1, d3[n:2 * n]), ""]

    # fallbacks: a Paley block (48), a power of two whose tile does not divide K, a float master
    m, sc, cm = _master(16, 96, g)
    s = torch.rand(2, 96, generator=g) + 0.5
    for r in (48, 32):
        try:
            requant_weight(m, sc, cm, s, bits=4, symmetric=False, rotation_block=r)
            res[f"refuses-R{r}"] = [False, "no error"]
        except ConfigError as e:
            res[f"refuses-R{r}"] = [True, str(e)]
    try:
        requant_weight(m.float(), None, cm, s, bits=4, symmetric=False, rotation_block=None)
        res["refuses-float-master"] = [False, "no error"]
    except ConfigError:
        res["refuses-float-master"] = [True, ""]

    # NaN / Inf in s: the kernel flags the layer id (clean rows flag nothing), the reference raises
    m, sc, cm = _master(40, 128, g)
    s = torch.rand(2, 128, generator=g) + 0.5
    flag = torch.full((1,), CLEAN, dtype=torch.int32)
    requant_weight(m, sc, cm, s, bits=4, symmetric=False, rotation_block=64, nonfinite_flag=flag, flag_id=5)
    clean = int(flag) == CLEAN
    for bad in (float("nan"), float("inf")):
        sb = s.clone()
        sb[1, 17] = bad
        flag.fill_(CLEAN)
        requant_weight(m, sc, cm, sb, bits=4, symmetric=False, rotation_block=64, nonfinite_flag=flag, flag_id=5)
        try:
            requant_weight_reference(m, sc, cm, sb, bits=4, symmetric=False, rotation_block=64)
            raised = False
        except NonFiniteError:
            raised = True
        res[f"nonfinite-{bad}"] = [clean and int(flag) == 5 and raised, f"flag={int(flag)} raised={raised}"]
    res.update(_op_checks())
    return res


def _op_checks() -> dict:
    """The whole FP8-path op (weight kernel + activation kernel with s_g + the INT8 GEMM's CPU form) against
    the emulated backend, bit for bit, on int-grid steps; one sample alone equals its slice of a batch of 7."""
    import torch
    import torch.nn as nn

    from dvdquant.kernels import ExecutionConfig
    from dvdquant.nn import QuantLinear, RuntimeState
    from dvdquant.nn.execution import emulated_forward, fp8_dynamic_forward
    from dvdquant.numerics import grids

    res = {}
    g = torch.Generator().manual_seed(1)
    for r, sym, bits, auto in ((64, False, 4, "none"), (None, True, 4, "none"), (16, False, 8, "none"),
                               (128, True, 6, "per_block")):
        k, n = 128, 48
        lin = nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        m = QuantLinear.from_params(lin, grids.quantize_weight_minmax(lin.weight.detach(), 4), a_bits=bits,
                                    rotation_block=r, auto_scale=auto, scale_block=k)
        m.set_dynamic_smoothing(lin.weight.detach(), alpha=0.5, symmetric=sym)
        m.bias = nn.Parameter(torch.randn(n, generator=g).to(torch.bfloat16), requires_grad=False)
        m.layer_name, m.state = "dyn.interp", RuntimeState(execution=ExecutionConfig("fp8"))
        x = (torch.randn(7, 19, k, generator=g) * (torch.rand(7, 1, k, generator=g) * 4 + 0.1))
        x[:, :, 11] *= 50.0
        x = x.to(torch.bfloat16)
        with torch.no_grad():
            y, ye = fp8_dynamic_forward(m, x), emulated_forward(m, x)
            alone = fp8_dynamic_forward(m, x[3:4])
        name = f"op-R{r}-sym{sym}-A{bits}-{auto}"
        res[name] = [y.dtype == ye.dtype == torch.bfloat16 and torch.equal(y, ye),
                     f"differing={float((y != ye).float().mean()):.2e}"]
        res[name + "-alone"] = [torch.equal(alone, y[3:4]), ""]
        m.state.a_bits = 16                                       # a weight-only step: the s = 1 weight
        with torch.no_grad():
            y16, ye16 = fp8_dynamic_forward(m, x), emulated_forward(m, x)
        rel = float((y16.float() - ye16.float()).norm() / ye16.float().norm())
        res[name + "-a16"] = [rel < 1e-2, f"rel={rel:.1e}"]
    return res


results = checks_fixture(__file__)


def test_kernel_equals_reference(results):
    bad = {k: v for k, v in results.items() if k.startswith(("exact", "sample")) and not v[0]}
    assert not bad, bad
    assert sum(k.startswith("exact") for k in results) == 30


def test_fp8_op_equals_the_emulated_backend(results):
    bad = {k: v for k, v in results.items() if k.startswith("op-") and not v[0]}
    assert not bad, bad
    assert sum(k.startswith("op-") for k in results) == 12


def test_unfusable_rotations_and_float_masters_are_refused(results):
    assert all(results[k][0] for k in ("refuses-R48", "refuses-R32", "refuses-float-master")), results


def test_nonfinite_rows_flag_the_layer(results):
    assert results["nonfinite-nan"][0] and results["nonfinite-inf"][0], results


if __name__ == "__main__":
    main(_checks)
