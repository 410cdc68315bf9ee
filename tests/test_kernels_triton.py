"""Triton kernels (activation quantization, int4 → FP8 expansion) vs their torch references,
on tiny shapes in Triton's CPU interpreter.

Why a subprocess: ``TRITON_INTERPRET=1`` must be set before triton is first imported, and in
one pytest process any earlier test (or plugin) may have imported triton already. So this
module runs its checks in a fresh interpreter (``python tests/test_kernels_triton.py``, which
sets the variable before importing anything) and the tests below assert on the JSON it
prints. One subprocess for the whole module keeps the cost at one torch + triton import.

Tolerances: none. Quantize only, rotation fused in the kernel (the snapped, exact ±1 rotation
of :mod:`dvdquant.numerics.hadamard`), expansion, packing: **bit-exact** codes and scales.
"""
from __future__ import annotations


from interpreter import checks_fixture, main



def _step_distance(a, b):
    """Distance in e4m3 grid steps between two float8_e4m3fn tensors (ordered bit patterns).
    For int-grid codes the distance is the integer difference instead (between 0 and 1 there
    are 56 e4m3 values)."""
    import torch

    def ordered(t):
        u = t.view(torch.uint8).to(torch.int32)
        mag = u & 0x7F
        return torch.where(u >= 128, -mag, mag)
    return (ordered(a) - ordered(b)).abs()


def _tie_rows(k):
    import torch
    ties_int = torch.zeros(k)
    ties_int[:6] = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -2.5])
    ties_fp8 = torch.zeros(k)
    ties_fp8[:10] = torch.tensor([448.0, 9.5, 17.0, -19.0, 0.0029296875, 240.0, -208.0, 1.0625, -1e-4, -0.0])
    return ties_int, ties_fp8


def _checks() -> dict:
    import torch

    from dvdquant.kernels.expand import ExpansionPool, expand_int4_to_fp8, expand_reference
    from dvdquant.kernels.triton_act_quant import act_quant, act_quant_reference
    from dvdquant.numerics.hadamard import hadamard_matrix
    from dvdquant.numerics.packing import pack_int4

    res = {}
    g = torch.Generator().manual_seed(0)

    def data(m, k, dtype):
        x = torch.randn(m, k, generator=g) * (torch.rand(k, generator=g) * 5 + 0.1)
        x[1] = 0.0
        return x.to(dtype)

    # 1. quantize only: exact
    for dtype, (fmt, bits), block, smooth_on, k in [
        (d, fb, b, s, k) for d in (torch.bfloat16, torch.float32)
        for fb in (("int", 4), ("int", 2), ("int", 5), ("fp8", 8)) for b in (None, 128)
        for s in (False, True) for k in (384, 80) if not (b and k % b)
    ]:
        x = data(37, k, dtype)
        ti, tf = _tie_rows(k)
        x[2] = (ti if fmt == "int" else tf).to(dtype)
        smooth = torch.rand(k, generator=g) + 0.5 if smooth_on else None
        c, s = act_quant(x, bits=bits, fmt=fmt, smooth=smooth, block=block, scales_k_major=block is not None)
        cr, sr = act_quant_reference(x, bits=bits, fmt=fmt, smooth=smooth, block=block)
        ok = torch.equal(c.view(torch.uint8), cr.view(torch.uint8)) and torch.equal(s.contiguous(), sr)
        res[f"exact-{dtype}-{fmt}{bits}-block{block}-smooth{smooth_on}-K{k}"] = [ok, ""]

    # 2. rotation fused: exact too (snapped input, exact ±1 sums); wide-range rows included
    for dtype, (fmt, bits), r, block, smooth_on in [
        (d, fb, r, b, s) for d in (torch.bfloat16, torch.float32, torch.float16) for fb in (("int", 4), ("fp8", 8))
        for r in (16, 64, 128) for b in (None, 128) for s in (False, True) if not (b and r > b)
    ]:
        k = 512
        x = data(37, k, dtype)
        x[3] = (torch.randn(k, generator=g) * torch.logspace(-12, 3, k)).to(dtype)   # 15 decades in one row
        smooth = torch.rand(k, generator=g) + 0.5 if smooth_on else None
        h = hadamard_matrix(r)
        cr, sr = act_quant_reference(x, bits=bits, fmt=fmt, smooth=smooth, h_block=h, block=block)
        c, s = act_quant(x, bits=bits, fmt=fmt, smooth=smooth, h_block=h, block=block)
        dist = _step_distance(c, cr) if fmt == "fp8" else (c.float() - cr.float()).abs()
        ok = torch.equal(c.view(torch.uint8), cr.view(torch.uint8)) and torch.equal(s.contiguous(), sr)
        res[f"rotated-{dtype}-{fmt}{bits}-R{r}-block{block}-smooth{smooth_on}"] = [
            ok, f"max_step={int(dist.max())} frac={float((dist > 0).float().mean()):.2e}"]

    # 2b. the second pass's cached snap constants change nothing (per token, R = tile)
    x = data(37, 512, torch.bfloat16)
    h = hadamard_matrix(128)
    for fmt, bits in (("int", 4), ("fp8", 8)):
        c1, s1 = act_quant(x, bits=bits, fmt=fmt, h_block=h)
        c2, s2 = act_quant(x, bits=bits, fmt=fmt, h_block=h, config={"snap_cache": False})
        res[f"snap-cache-{fmt}{bits}"] = [torch.equal(c1.view(torch.uint8), c2.view(torch.uint8))
                                          and torch.equal(s1, s2), ""]

    # 2b'. the second pass walked backwards, with L2 eviction hints, or dividing with div.rn instead of the
    # default fma division, changes nothing (rotated, and unrotated with K not a multiple of the 256-wide tile:
    # the last, partial tile comes first)
    for k, r in ((512, 128), (512, 64), (400, None)):
        xr = data(37, k, torch.bfloat16)
        hr = None if r is None else hadamard_matrix(r)
        cr, sr = act_quant_reference(xr, bits=4, h_block=hr)
        for cfg in ({"reverse": True}, {"reverse": True, "evict1": "evict_last", "evict2": "evict_first"},
                    {"fma_div": False}):
            c, s = act_quant(xr, bits=4, h_block=hr, config=cfg)
            same = torch.equal(c.view(torch.uint8), cr.view(torch.uint8)) and torch.equal(s, sr)
            res[f"snap-cache-second-pass-K{k}-R{r}-{'-'.join(cfg)}"] = [same, ""]

    # 2c. the opt-in inexact rotation (no snap) stays within one code of the exact one on ≤ 1 % of elements
    for r in (64, 128):
        cx, _ = act_quant(x, bits=4, h_block=hadamard_matrix(r))
        cn, _ = act_quant(x, bits=4, h_block=hadamard_matrix(r), config={"snap": False})
        d = (cx.float() - cn.float()).abs()
        res[f"snap-cache-inexact-R{r}"] = [int(d.max()) <= 1 and float((d > 0).float().mean()) <= 1e-2,
                                           f"max={int(d.max())} frac={float((d > 0).float().mean()):.1e}"]

    # 2d. 6–8-bit int-grid codes stored as int8 (the INT8 GEMM's operand): exact, rotated or not
    for bits, r, block in ((8, None, None), (6, 128, None), (8, 64, None), (8, 128, 128)):
        xi = data(37, 512, torch.bfloat16)
        h = None if r is None else hadamard_matrix(r)
        c, s = act_quant(xi, bits=bits, h_block=h, block=block, codes_dtype=torch.int8)
        cr, sr = act_quant_reference(xi, bits=bits, h_block=h, block=block, codes_dtype=torch.int8)
        res[f"exact-int8codes-A{bits}-R{r}-block{block}"] = [c.dtype == torch.int8 and torch.equal(c, cr)
                                                             and torch.equal(s.contiguous(), sr), ""]

    # 3. NaN / Inf rows get an inf scale; other rows unaffected
    x = data(20, 256, torch.float32)
    x[4, 9] = float("nan")
    x[7, 3] = float("inf")
    c, s = act_quant(x, bits=4)
    cr, sr = act_quant_reference(x[[0, 1, 2]], bits=4)
    res["nan-inf-scale"] = [bool(torch.isinf(s[4]).all() and torch.isinf(s[7]).all()
                                 and torch.equal(s[:3], sr)), ""]

    # 3b. the device flag records the smallest id of a layer that saw NaN/Inf, and nothing else
    from dvdquant.kernels.finite import CLEAN
    h128 = hadamard_matrix(128)
    xb = x.to(torch.bfloat16)
    for name, kw, inp in (("tok", {}, x), ("blk", {"block": 128}, x), ("rot", {"h_block": h128}, x),
                          ("rot-bf16", {"h_block": h128}, xb), ("rot-bf16-blk", {"h_block": h128, "block": 128}, xb)):
        flag = torch.full((1,), CLEAN, dtype=torch.int32)
        act_quant(inp[:3], bits=4, nonfinite_flag=flag, flag_id=7, **kw)          # clean rows
        clean = int(flag) == CLEAN
        act_quant(inp, bits=4, nonfinite_flag=flag, flag_id=9, **kw)
        act_quant(inp, bits=4, nonfinite_flag=flag, flag_id=11, **kw)
        res[f"nonfinite-flag-{name}"] = [clean and int(flag) == 9, f"flag={int(flag)}"]
    # the ±1 tile is cached per block tensor (no host copy per call) and rebuilt after an in-place write
    from dvdquant.kernels.triton_act_quant import _hadamard_tile
    ha = hadamard_matrix(64)
    t1, t2 = _hadamard_tile(ha, 128, torch.float32, "cpu"), _hadamard_tile(ha, 128, torch.float32, "cpu")
    ha.mul_(-1.0)
    t3 = _hadamard_tile(ha, 128, torch.float32, "cpu")
    with torch.inference_mode():                 # inference tensors have no version counter
        hi = hadamard_matrix(64)
        t4, t5 = _hadamard_tile(hi, 128, torch.float32, "cpu"), _hadamard_tile(hi, 128, torch.float32, "cpu")
    res["tile-cache"] = [t1 is t2 and t3 is not t1 and torch.equal(t3, -t1) and t4 is t5, ""]

    # 4. int4 → fp8 expansion: exact, ragged shapes, pooled buffer reused
    pool = ExpansionPool()
    for n, k in ((48, 96), (33, 300), (64, 512)):
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        z = torch.randint(0, 16, (n, 1), generator=g).float()
        p = pack_int4(q)
        out = expand_int4_to_fp8(p, z)
        ok = torch.equal(out.view(torch.uint8), expand_reference(p, z).view(torch.uint8))
        b1 = pool.expand(p, z).data_ptr()
        b2 = pool.expand(p, z).data_ptr()
        res[f"expand-{n}x{k}"] = [bool(ok and b1 == b2), ""]
        w_i8 = pool.expand(p, z, torch.int8)
        res[f"expand-int8-{n}x{k}"] = [torch.equal(w_i8, expand_reference(p, z, torch.int8))
                                       and torch.equal(w_i8.float(), expand_reference(p, z).float()), ""]
    # every packed byte under every zero point 0..15: the whole (z, byte) → int16 table, exhaustively
    p_all, z_all = torch.arange(256, dtype=torch.uint8).repeat(16, 1), torch.arange(16.0).reshape(16, 1)
    ok = torch.equal(expand_int4_to_fp8(p_all, z_all).view(torch.uint8), expand_reference(p_all, z_all).view(torch.uint8))
    res["expand-all-bytes-all-zero-points"] = [bool(ok), ""]

    res.update(_int8_gemm_checks(g))
    res.update(_fp8_forward_checks())
    res.update(_fused_checks())
    return res


def _int8_gemm_checks(g) -> dict:
    """The Triton INT8 GEMM with its fused epilogue == numerics.linear (the emulated path's formula), bit for
    bit in fp32 out; ragged M and N, bias on and off, several K steps; both kernels (pointer loads, and the
    persistent one with TMA descriptors)."""
    import torch

    from dvdquant.errors import ConfigError
    from dvdquant.kernels.int8_gemm import int8_gemm
    from dvdquant.numerics.linear import linear_per_token_per_channel

    res = {}
    cfg = {"block_m": 16, "block_n": 32, "block_k": 32, "group_m": 2, "num_warps": 4, "num_stages": 1}
    for m, n, k, has_bias in ((37, 48, 96, True), (16, 80, 64, False), (5, 32, 128, True)):
        q = torch.randint(-127, 128, (m, k), generator=g).to(torch.int8)
        w = torch.randint(-15, 16, (n, k), generator=g).to(torch.int8)
        s = torch.rand(m, 1, generator=g) * 0.1 + 1e-3
        d = torch.rand(n, 1, generator=g) * 0.01 + 1e-4
        b = torch.randn(n, generator=g).to(torch.bfloat16) if has_bias else None
        ref = linear_per_token_per_channel(q, s, w.float(), d, b, 127 * 15)
        for tma in (False, True):                 # pointer loads / TMA descriptors, persistent (3 programs)
            y = int8_gemm(q, s, w, d, b, out_dtype=torch.float32, config=dict(cfg, tma=tma, programs=3))
            res[f"int8gemm-M{m}-N{n}-K{k}-bias{has_bias}-tma{tma}"] = [torch.equal(y, ref), ""]
    m, n, k = 21, 40, 80                          # TMA kernel: K = 2.5 tiles, the tail read as zeros
    q = torch.randint(-127, 128, (m, k), generator=g).to(torch.int8)
    w = torch.randint(-15, 16, (n, k), generator=g).to(torch.int8)
    s, d = torch.rand(m, 1, generator=g) + 1e-3, torch.rand(n, 1, generator=g) * 0.01 + 1e-4
    y = int8_gemm(q, s, w, d, None, out_dtype=torch.float32, config=dict(cfg, tma=True, programs=2))
    res["int8gemm-tma-ragged-K"] = [torch.equal(y, linear_per_token_per_channel(q, s, w.float(), d, None, 127 * 15)), ""]
    big = torch.full((m + 5, n), float("nan"))            # out=: rows 3..3+m of a larger output, the rest untouched
    yo = int8_gemm(q, s, w, d, None, out_dtype=torch.float32, config=dict(cfg, tma=True, programs=2), out=big[3:3 + m])
    try:
        int8_gemm(q, s, w, d, None, out_dtype=torch.float32, config=dict(cfg, tma=True), out=big[:m, :n - 1])
        refused = False
    except ConfigError:
        refused = True
    res["int8gemm-out-rows"] = [yo.data_ptr() == big[3].data_ptr() and torch.equal(big[3:3 + m], y) and refused
                                and bool(big[:3].isnan().all() and big[3 + m:].isnan().all()), ""]
    return res


def _fused_checks() -> dict:
    """The fused sibling op (one activation quantization, one GEMM over stacked weights) == the members'
    own fp8 forwards side by side, bit for bit: A4 and A8 on the INT8 path (``_int_mm`` on CPU), A4 on the
    FP8 path (int8_gemm off), with and without bias."""
    import torch
    import torch.nn as nn

    from dvdquant.kernels import ExecutionConfig
    from dvdquant.nn import QuantLinear, RuntimeState
    from dvdquant.nn import execution as nx
    from dvdquant.numerics import grids

    res = {}
    g = torch.Generator().manual_seed(5)
    for bias in (True, False):
        state = RuntimeState()
        members = []
        for n in (64, 32, 48):
            lin = nn.Linear(128, n, bias=bias)
            wq = grids.quantize_weight_minmax(torch.randn(n, 128, generator=g) * 0.05, 4)
            m = QuantLinear.from_params(lin, wq, a_bits=4, rotation_block=64)
            m.state = state
            if bias:
                m.bias.data = m.bias.data.to(torch.bfloat16)
            members.append(m)
        x = (torch.randn(2, 9, 128, generator=g) * 3).to(torch.bfloat16)
        for bits, int8 in ((4, True), (8, True), (4, False)):
            state.a_bits = bits
            state.execution = ExecutionConfig("fp8", int8_gemm=int8)
            y = nx.fp8_forward_fused(members, x)
            ref = torch.cat([nx.fp8_forward(m, x) for m in members], dim=-1)
            res[f"fused-A{bits}-int8{int8}-bias{bias}"] = [torch.equal(y, ref), f"shape {tuple(y.shape)}"]
    return res


def _fp8_forward_checks() -> dict:
    """The whole fp8 forward (row-wise ``_scaled_mm`` runs on CPU in torch ≥ 2.6) vs emulated."""
    import torch
    import torch.nn as nn

    from dvdquant.kernels import ExecutionConfig
    from dvdquant.kernels import fp8 as fp8mod
    from dvdquant.nn import QuantLinear, RuntimeState
    from dvdquant.nn.execution import (dequantized_weight, emulated_forward, fp8_forward, quantize_activations,
                                       selected_smooth)
    from dvdquant.numerics import grids

    res = {}
    g = torch.Generator().manual_seed(3)
    k, n = 256, 96
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
    wq = grids.quantize_weight_minmax(lin.weight.detach(), 4)
    for rot, smooth in ((None, False), (64, False), (128, True), (512, False)):
        kk = 512 if rot == 512 else k
        if kk != k:
            lin2 = nn.Linear(kk, n)
            wq2 = grids.quantize_weight_minmax(torch.randn(n, kk, generator=g) * 0.05, 4)
            m = QuantLinear.from_params(lin2, wq2, a_bits=4, rotation_block=rot)
        else:
            m = QuantLinear.from_params(lin, wq, a_bits=4, rotation_block=rot,
                                        smooth=torch.rand(1, k, generator=g) + 0.5 if smooth else None)
        m.state = RuntimeState()
        m.bias.data = m.bias.data.to(torch.bfloat16)            # a bf16 model's bias (the fp8 path adds it in bf16)
        x = (torch.randn(3, 19, kk, generator=g) * 2).to(torch.bfloat16)
        for bits in (4, 8, 4, 6):                                  # δ-GBS switching
            m.state.a_bits = bits
            m.state.execution = ExecutionConfig("fp8", int8_gemm=False)   # opt-out: A4 on the FP8 GEMM, A6/A8 e4m3
            y = fp8_forward(m, x, bits, per_block=False).float()
            m.state.execution = ExecutionConfig("fp8")
            x2 = m.transform_input(x.reshape(-1, kk).float())
            fmt = "int" if bits == 4 else "fp8"
            ref = quantize_activations(m, x2, bits, fmt).dequantize() @ dequantized_weight(m).t() + m.bias.float()
            rel = float((y.reshape(-1, n) - ref).norm() / ref.norm())
            res[f"fp8-forward-rot{rot}-smooth{smooth}-A{bits}"] = [rel < 1e-2, f"rel={rel:.2e}"]
            # the INT8 GEMM for every int-grid step (default): int8 codes, torch._int_mm on CPU (exact too)
            # and the emulated epilogue
            full = fp8_forward(m, x, bits, per_block=False)
            same = torch.equal(full, emulated_forward(m, x))
            res[f"fp8-forward-rot{rot}-smooth{smooth}-A{bits}-int8-exact"] = [same, ""]
            # per-token scales and an exact GEMM: a sample's output does not depend on the batch
            alone = torch.equal(fp8_forward(m, x[1:2], bits, per_block=False), full[1:2])
            res[f"fp8-forward-rot{rot}-smooth{smooth}-A{bits}-batch-independent"] = [alone, ""]
            if bits == 4:
                # A4 on the FP8 GEMM (int8_gemm=False, above): the same codes and scales bit for bit as the emulated path (exact rotation), and the
                # same output up to the epilogue: torch's CPU _scaled_mm rounds in another order than cuBLAS
                # (whose order the emulated path follows; bit-equality is asserted on the GPU): rounding-level
                # differences (one bf16 ulp of the sum's terms, which cancel near zero) on ≤ 0.1 % of outputs
                qa = quantize_activations(m, x2, 4, "int")
                q8, s8 = fp8mod.quantize_tokens(x.reshape(-1, kk), 4, "int", selected_smooth(m),
                                                int(rot or 0), None)
                same = torch.equal(q8.float(), qa.codes.float()) and torch.equal(s8, qa.scale)
                ye = emulated_forward(m, x)
                ulp = float(ye.float().abs().max()) * 2.0 ** -8
                off = (y.float() - ye.float()).abs()
                frac = float((off > 0).float().mean())
                res[f"fp8-forward-rot{rot}-smooth{smooth}-A4-codes-exact"] = [
                    same and bool((off <= ulp).all()) and frac <= 1e-3, f"codes equal {same}, differing {frac:.1e}"]
    # NaN input on the FP8 path: no error in the layer (no sync), raised once at the step's end
    from dvdquant import NonFiniteError, raise_if_nonfinite
    m.layer_name = "blocks.3.ff"
    xn = x.clone()
    xn[0, 2, 5] = float("nan")
    fp8_forward(m, xn, 4, per_block=False)
    try:
        raise_if_nonfinite()
        res["nonfinite-raised-at-step-end"] = [False, "no error"]
    except NonFiniteError as e:
        again = None
        try:
            raise_if_nonfinite()                  # the flag was reset
        except NonFiniteError as e2:
            again = e2
        res["nonfinite-raised-at-step-end"] = ["blocks.3.ff" in str(e) and again is None, str(e)[:120]]
    res.update(_compile_checks())
    return res


def _compile_checks() -> dict:
    """torch.compile of a block with FP8-path QuantLinears: one graph, no recompilation when the
    shared bits switch A4 → A8 → A4, same output as eager; the custom op passes ``opcheck``.
    The plan is forced onto the FP8 path on this CPU by reporting an sm90 capability."""
    import torch
    import torch.nn as nn

    import dvdquant.kernels as kernels
    from dvdquant.kernels import ExecutionConfig
    from dvdquant.kernels import fp8 as fp8mod
    from dvdquant.kernels.finite import layer_key
    from dvdquant.nn import QuantLinear, RuntimeState
    from dvdquant.numerics import grids

    res = {}
    kernels.device_capability = lambda device: (9, 0)
    g = torch.Generator().manual_seed(5)
    state = RuntimeState(execution=ExecutionConfig("fp8"))

    def qlin(k, n, rot):
        lin = nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        q = QuantLinear.from_params(lin, grids.quantize_weight_minmax(lin.weight.detach(), 4), a_bits=4,
                                    rotation_block=rot)
        q.state = state
        return q

    block = nn.Sequential(nn.LayerNorm(128, dtype=torch.bfloat16), qlin(128, 256, 128), nn.GELU(approximate="tanh"), qlin(256, 128, 64))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd
        return aot_autograd(fw_compiler=lambda g_, _: g_)(gm, example_inputs)

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    x = (torch.randn(2, 24, 128, generator=g) * 2).to(torch.bfloat16)
    ok, detail = True, []
    with torch.no_grad():
        for bits in (4, 8, 4, 16):
            state.a_bits = bits
            ye, yc = block(x), compiled(x)
            rel = float((ye.float() - yc.float()).norm() / ye.float().norm())
            ok &= rel < 1e-2 if bits == 16 else torch.equal(ye, yc)
            detail.append(f"A{bits}:rel={rel:.1e}")
    res["compile-fullgraph-no-recompile"] = [ok and len(graphs) == 1, f"graphs={len(graphs)} " + " ".join(detail)]
    # blocks of the same form whose layers differ only in their names share one compiled frame (a per-block
    # compile, as when hooks between blocks break the graph): the name reaches the op as a tensor, not a guard
    shared = []

    def count_graphs(gm, example_inputs):
        shared.append(gm)
        return gm.forward

    same_form = [nn.Sequential(qlin(128, 256, 128), nn.GELU(approximate="tanh"), qlin(256, 128, 64)) for _ in range(3)]
    eager = []
    state.a_bits = 4
    with torch.no_grad():
        for i, blk in enumerate(same_form):
            blk[0].layer_name, blk[2].layer_name = f"blocks.{i}.ff.0", f"blocks.{i}.ff.2"
            eager.append(blk(x))
            blk.compile(fullgraph=True, backend=count_graphs)
        first = same_form[0](x)
        n_first = len(shared)
        same = torch.equal(first, eager[0]) and all(torch.equal(b(x), e) for b, e in zip(same_form[1:], eager[1:]))
    shared_ok = same and n_first > 0 and len(shared) == n_first
    res["compile-same-form-layers-share-a-frame"] = [shared_ok, f"graphs after block 0: {n_first}, after all: "
                                                                 f"{len(shared)}, outputs equal eager: {same}"]
    q = block[1]
    opts = fp8mod.FP8Options(a_bits=4, rotation_block=128, scale_block=128)
    args = (x.reshape(-1, 128), [q.qweight], [q.w_zero], q.w_scale, q.bias, None, state.bits_tensor)
    fused = (x.reshape(-1, 128), [q.qweight, q.qweight], [q.w_zero, q.w_zero], q.w_scale.repeat(2, 1),
             q.bias.repeat(2), None, state.bits_tensor, opts.encode(), layer_key("opcheck"))
    try:
        torch.library.opcheck(fp8mod.w4_linear_fp8, args + (opts.encode(), layer_key("opcheck")))
        fast = fp8mod.FP8Options(a_bits=4, rotation_block=128, scale_block=128, fast_accum=True)
        torch.library.opcheck(fp8mod.w4_linear_fp8, args + (fast.encode(), layer_key("opcheck")))
        torch.library.opcheck(fp8mod.w4_linear_fp8, fused)                 # two sibling weights, one GEMM
        res["custom-op-opcheck"] = [True, ""]
    except Exception as e:  # noqa: BLE001 - reported as a failed check with its message
        res["custom-op-opcheck"] = [False, f"{type(e).__name__}: {str(e)[:300]}"]
    return res


results = checks_fixture(__file__)


def test_quantize_only_is_bit_exact(results):
    bad = {k: v for k, v in results.items() if k.startswith("exact-") and not v[0]}
    assert len([k for k in results if k.startswith("exact-")]) >= 40 and not bad, bad


def test_fused_rotation_is_bit_exact(results):
    bad = {k: v for k, v in results.items() if k.startswith(("rotated-", "snap-cache-")) and not v[0]}
    assert len([k for k in results if k.startswith("rotated-")]) >= 60 and not bad, bad


def test_nan_rows_get_inf_scales(results):
    assert results["nan-inf-scale"][0]


def test_nonfinite_flag_without_sync(results):
    bad = {k: v for k, v in results.items() if k.startswith(("nonfinite-", "tile-cache")) and not v[0]}
    assert len([k for k in results if k.startswith("nonfinite-flag-")]) == 5 and not bad, bad
    assert "nonfinite-raised-at-step-end" in results and "tile-cache" in results


def test_int8_gemm_fused_epilogue_is_exact(results):
    bad = {k: v for k, v in results.items() if k.startswith("int8gemm-") and not v[0]}
    assert len([k for k in results if k.startswith("int8gemm-")]) == 8 and not bad, bad


def test_expansion_is_exact(results):
    bad = {k: v for k, v in results.items() if k.startswith("expand-") and not v[0]}
    assert len([k for k in results if k.startswith("expand-")]) == 7 and not bad, bad


def test_fp8_forward_matches_emulated_on_cpu(results):
    bad = {k: v for k, v in results.items() if k.startswith("fp8-forward") and not v[0]}
    assert not bad, bad


def test_compiled_fp8_block_one_graph_no_recompile(results):
    assert results["compile-fullgraph-no-recompile"][0], results["compile-fullgraph-no-recompile"]
    assert results["compile-same-form-layers-share-a-frame"][0], results["compile-same-form-layers-share-a-frame"]
    assert results["custom-op-opcheck"][0], results["custom-op-opcheck"]


if __name__ == "__main__":
    main(_checks)


def test_small_token_counts_get_16_row_programs():
    """rows_config: 64-row programs while they fill a wave of SMs, else 16-row ones (text tokens), unless the
    caller fixes block_m; the kernel computes the same rows either way (interpreter tests use many block_m)."""
    from dvdquant.kernels.triton_act_quant import DEFAULT_CONFIG, PER_TOKEN_CONFIG, SMALL_M_CONFIG, rows_config
    tok = dict(DEFAULT_CONFIG, **PER_TOKEN_CONFIG)
    assert rows_config(32760, 132, None) == tok and tok["fma_div"] and tok["num_warps"] == 4
    assert rows_config(32760, 132, None, per_token=False) == DEFAULT_CONFIG   # per-block scales: one pass, 8 warps
    assert rows_config(512, 132, None) == dict(tok, **SMALL_M_CONFIG)
    assert rows_config(64 * 132, 132, None)["block_m"] == 64 and rows_config(64 * 131, 132, None)["block_m"] == 16
    assert rows_config(512, 132, {"block_m": 32})["block_m"] == 32
    assert rows_config(512, 132, {"num_warps": 8})["num_warps"] == 8        # a caller's keys always win
    assert rows_config(512, 0, None) == tok                               # CPU / interpreter: no small-M switch


def test_fused_sibling_op_equals_members(results):
    bad = {k: v for k, v in results.items() if k.startswith("fused-") and not v[0]}
    assert len([k for k in results if k.startswith("fused-")]) == 6 and not bad, bad
