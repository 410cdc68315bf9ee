"""Probe: why is a single-pass per-token activation kernel slow? (GPU; prints, writes JSON.)

    PYTHONPATH=src python benchmarks/probe_act_row.py --out bench_out

Times, at M = 16k bf16 tokens and K in (3072, 12288, 15360), per-token int4 codes:

* ``floor``   — bf16 → fp8 ``copy_`` (read 2 B, write 1 B per element);
* ``legacy``  — the two-pass kernel (``act_quant(kernel="legacy")``), rotated and not;
* ``flat``    — minimal one-pass kernels written here: one token row per program as a 1-D
  vector (no rotation), and the same row viewed as (NB, 128) for the ±1 dot (rotation; NB =
  next power of two of K/128, padding blocks masked);

and prints each compiled kernel's registers and spills, to tell a memory-access problem from
register pressure. Session 5 also measured a persistent, software-pipelined row-group version
(k-blocks of ROWS rows as the dot's rows, 16 launch configs) in the library: with the best
launch config per case it was 1.6–2.7× slower than the two-pass kernel on an H100, and it was
removed (docs/results/speed.md §0a).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from dvdquant.kernels.quant_jit import scale_of  # noqa: E402


@triton.jit
def flat_row_kernel(x_ptr, h_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, qmax, inv_qmax, inv_sqrt_r,
                    NB: tl.constexpr, TILE: tl.constexpr, ROTATE: tl.constexpr):
    """One token row per program; rotated: the row viewed as (NB, TILE) through 2-D pointers."""
    row = tl.program_id(0).to(tl.int64)
    b = tl.arange(0, NB)
    kk = tl.arange(0, TILE)
    cols = b[:, None] * TILE + kk[None, :]                       # (NB, TILE)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0)
    if ROTATE:
        h = tl.load(h_ptr + kk[:, None] * TILE + kk[None, :])
        xr = tl.dot(x, h) * inv_sqrt_r
    else:
        xr = x.to(tl.float32)
    amax = tl.max(tl.max(tl.abs(xr), axis=1), axis=0)
    s = scale_of(amax, qmax, inv_qmax, True)
    y = tl.math.div_rn(xr, tl.zeros_like(xr) + s)
    c = tl.minimum(tl.maximum((y + 12582912.0) - 12582912.0, -qmax), qmax)
    tl.store(q_ptr + row * stride_qm + cols, c.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, s)


@triton.jit
def flat_1d_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, qmax, inv_qmax, BLOCK: tl.constexpr):
    """Unrotated, one token row per program as a 1-D vector: the simplest single pass."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    s = scale_of(amax, qmax, inv_qmax, True)
    y = tl.math.div_rn(x, tl.zeros_like(x) + s)
    c = tl.minimum(tl.maximum((y + 12582912.0) - 12582912.0, -qmax), qmax)
    tl.store(q_ptr + row * stride_qm + cols, c.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, s)


def _regs(k) -> dict:
    return {"n_regs": getattr(k, "n_regs", None), "n_spills": getattr(k, "n_spills", None)}


def main() -> None:
    from triton.testing import do_bench

    from dvdquant.kernels.triton_act_quant import _hadamard_tile, act_quant, act_quant_kernel
    from dvdquant.numerics.hadamard import hadamard_matrix

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--m", type=int, default=16384)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t = lambda fn: do_bench(fn, warmup=5, rep=20, return_mode="median")  # noqa: E731
    h = hadamard_matrix(128, device="cuda")
    tile = _hadamard_tile(h, 128, torch.bfloat16, "cuda")
    res = {"device": torch.cuda.get_device_name(), "M": args.m, "cases": {}}
    for k in (3072, 12288, 15360):
        x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
        q = torch.empty(args.m, k, device="cuda", dtype=torch.float8_e4m3fn)
        s = torch.empty(args.m, 1, device="cuda", dtype=torch.float32)
        nb = triton.next_power_of_2(k // 128)
        r = {"floor": t(lambda: q.copy_(x))}
        for rot in (False, True):
            hb = h if rot else None
            tag = "rot" if rot else "norot"
            r[f"legacy_{tag}"] = t(lambda: act_quant(x, bits=4, h_block=hb, kernel="legacy"))
            for w in (4, 8, 16):
                def run(w=w, rot=rot):
                    return flat_row_kernel[(args.m,)](x, tile, q, s, k, x.stride(0), q.stride(0), 7.0, 1 / 7.0,
                                                      0.08838834764831845, NB=nb, TILE=128, ROTATE=rot, num_warps=w)
                kern = run()
                r[f"flat2d_{tag}_w{w}"] = t(run)
                r[f"flat2d_{tag}_w{w}_regs"] = _regs(kern)
        for w in (4, 8, 16):
            def run1(w=w):
                return flat_1d_kernel[(args.m,)](x, q, s, k, x.stride(0), q.stride(0), 7.0, 1 / 7.0,
                                                 BLOCK=triton.next_power_of_2(k), num_warps=w)
            kern = run1()
            r[f"flat1d_norot_w{w}"] = t(run1)
            r[f"flat1d_norot_w{w}_regs"] = _regs(kern)
        # registers of the shipped kernel (its compiled variants live in the kernel's cache)
        for name, jit in (("legacy", act_quant_kernel),):
            for dev_cache in getattr(jit, "device_caches", {}).values():
                cache = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
                r[f"{name}_compiled"] = [_regs(c) for c in list(cache.values())[-4:]]
        res["cases"][f"K{k}"] = r
        print(f"K={k}", json.dumps({kk: (round(v, 3) if isinstance(v, float) else v) for kk, v in r.items()}), flush=True)
        del x, q
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "probe_act_row.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
