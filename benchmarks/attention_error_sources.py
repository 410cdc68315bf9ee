"""Where the 8-bit attention's error comes from on flat attention: each quantization on or off, CPU.

    PYTHONPATH=src python3 benchmarks/attention_error_sources.py --out docs/results/attention_error_sources_cpu.json

Inputs (issue #23 item 5): q, k, v ~ N(0, 1) in bf16, (1, L, H, D), plus a per-head constant added to K.
Every row attends to thousands of keys about equally ("flat" attention), so the output is a small average
of random V rows and every per-element rounding of P or V passes straight into it (relative).

The emulation follows ``attention_ref`` (K smoothing, per-token INT8 Q/K, the online softmax over key
tiles of 128 in the kernel's order, P = e4m3(448·p) against the running max, V centred and per-channel
e4m3), with each quantization switchable, plus what the reference does not model: the **accumulator of
Hopper's FP8 MMA**. Model (``--acc-bits``): each wgmma k-step (32 keys) aligns its addends — the incoming
accumulator and the 32 products P_ij·V_jd — to the largest exponent among them and truncates each toward
zero to ``acc_bits`` bits below that exponent (SageAttention2 measured ≈ 22-bit floats, i.e. 13 mantissa
bits; DeepSeek-V3 reports "around 14 bits"); sums and rescales are otherwise fp32. ``acc="fp22"``: one running accumulator
fed to every MMA (the kernels before issue #23); ``"fp22_tile"``: each key tile's P·V into a fresh
accumulator, added to the running one in fp32 (two-level, the kernels after). Everything else runs in
fp64, so only the switched-on effects show. Errors are rel. L2 against fp64 attention on the same bf16
inputs, over ``--queries`` query rows of every head (rows are independent; K/V statistics use all keys).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import torch

from dvdquant.kernels.attention_ref import (LOG2_P_SCALE, LOG2E, kv_stats, quant_attention_reference, quantize_kv_reference,
                                           quantize_q_reference)

BLOCK_N = 128
K_STEP = 32          # keys per FP8 wgmma instruction (m64nNk32)


def flat_inputs(H: int, L: int, D: int, k_offset: float, seed: int):
    """q, k, v (1, L, H, D) bf16-valued fp32: N(0, 1), K plus ``k_offset``·N(0, 1) per head (one constant)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, L, H, D, generator=g).bfloat16().float() for _ in range(3))
    k = (k + k_offset * torch.randn(1, 1, H, 1, generator=g)).bfloat16().float()
    return q, k, v


def exact_attention(q, k, v, scale):
    """fp64 softmax attention, (R, D) per head stacked: q (H, Lq, D), k/v (H, L, D)."""
    s = torch.einsum("hqd,hkd->hqk", q.double(), k.double()) * scale
    return torch.softmax(s, dim=-1) @ v.double()


def _trunc_add(c: torch.Tensor, x: torch.Tensor, bits: int) -> torch.Tensor:
    """c (R, D) + Σ_i x (R, n, D) with every addend aligned to the largest exponent and truncated toward
    zero to ``bits`` bits below it (the FP8 MMA accumulator model); fp64 in, fp32-rounded out."""
    big = torch.maximum(c.abs(), x.abs().amax(dim=1)).clamp_min(1e-30)
    ulp = torch.ldexp(torch.ones_like(big), torch.frexp(big).exponent - 1 - bits)
    s = torch.trunc(c / ulp) + torch.trunc(x / ulp[:, None, :]).sum(dim=1)
    return (s * ulp).float().double()


def _round(x: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "none":
        return x
    if fmt == "e4m3":
        return x.float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn).double()
    if fmt == "fp16":
        return x.half().double()
    if fmt == "bf16":
        return x.bfloat16().double()
    raise ValueError(fmt)


def emulate(q, k, v, scale, qk: str = "int8", p_fmt: str = "e4m3", v_fmt: str = "e4m3", l_from: str = "p",
            acc: str = "exact", acc_bits: int = 13, v_offset: str = "codes"):
    """The 8-bit attention of ``attention_ref`` with switches; q (H, Lq, D), k/v (H, L, D) → (H, Lq, D) fp64.

    qk: "int8" codes or "exact" (fp64 Q·K'ᵀ); p_fmt/v_fmt: "e4m3" (the kernel), "fp16", "bf16", "none";
    l_from: "p" (row sum of the unrounded p, the kernel) or "p8" (of the rounded P); acc: "exact", "fp22"
    (one accumulator through every MMA) or "fp22_tile" (fresh accumulator per key tile, fp32 add); v_offset: the
    constant the output adds, "mean" = mean(V) (before issue #23) or "codes" = mean(V) − the mean of V's
    rounding error over the keys (``attention_ref``: flat rows average V's codes, so their mean error is a
    per-channel bias of the output)."""
    H, Lq, D = q.shape
    L = k.shape[1]
    c = scale * LOG2E
    kv = quantize_kv_reference(k.transpose(0, 1)[None], v.transpose(0, 1)[None], "int8", BLOCK_N)
    if qk == "int8":
        q8, sq = quantize_q_reference(q.transpose(0, 1)[None], "int8")
        s_all = (q8[0].double() @ kv.k8[0].double().transpose(-1, -2)) * kv.k_scale[0].double()[:, None, :] \
            * (sq[0].double() * c)[..., None]
    else:
        kc = k.double() - kv.k_mean[0].double()[:, None, :]
        s_all = torch.nn.functional.pad(q.double() @ kc.transpose(-1, -2) * c, (0, kv.k8.shape[2] - L))
    s_all[..., L:] = float("-inf")
    v_mean = kv_stats(k.transpose(0, 1)[None], v.transpose(0, 1)[None])[1][0].double()            # (H, D)
    vc = (v.double() - v_mean[:, None, :]) / kv.v_scale[0].double()[:, None, :]   # V' in code units
    v_codes = torch.nn.functional.pad(_round(vc, v_fmt), (0, 0, 0, kv.k8.shape[2] - L))         # (H, Lkp, D)
    offset = v_mean
    if v_offset == "codes":
        offset = offset - v_codes.sum(dim=1) / L * kv.v_scale[0].double()
    m = torch.full((H, Lq), float("-inf"), dtype=torch.float64)
    l = torch.zeros(H, Lq, dtype=torch.float64)
    o = torch.zeros(H * Lq, D, dtype=torch.float64)
    for n0 in range(0, s_all.shape[-1], BLOCK_N):
        s = s_all[..., n0:n0 + BLOCK_N]
        m_new = torch.maximum(m, s.amax(dim=-1))
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(s - (m_new - LOG2_P_SCALE)[..., None])                 # 448·p
        p8 = _round(p, p_fmt)
        l = l * alpha + (p if l_from == "p" else p8).sum(dim=-1)
        vt = v_codes[:, n0:n0 + BLOCK_N]
        o = o * alpha.reshape(-1, 1)
        if acc == "exact":
            o = o + (p8 @ vt).reshape(-1, D)
        else:
            prod = (p8[..., :, None] * vt[:, None, :, :]).reshape(H * Lq, BLOCK_N, D)   # exact products
            part = o if acc == "fp22" else torch.zeros_like(o)
            for k0 in range(0, BLOCK_N, K_STEP):
                part = _trunc_add(part, prod[:, k0:k0 + K_STEP], acc_bits)
            o = part if acc == "fp22" else (o + part).float().double()
        m = m_new
    out = o.reshape(H, Lq, D) / l[..., None]
    return out * kv.v_scale[0].double()[:, None, :] + offset[:, None, :]


def rel_l2(o, r):
    return float((o - r).norm() / r.norm())


KERNEL = dict(qk="int8", p_fmt="e4m3", v_fmt="e4m3", l_from="p", acc="exact", v_offset="codes")
BEFORE = dict(v_offset="mean")
CONFIGS = {   # name: switches over KERNEL (the reference's numerics, exact accumulation)
    "reference now (Q·Kᵀ INT8, P e4m3, V e4m3, offset corrected)": {},
    "reference before (output offset mean(V))": BEFORE,
    "only Q·Kᵀ INT8 (P, V unrounded)": dict(p_fmt="none", v_fmt="none"),
    "only P e4m3": dict(qk="exact", v_fmt="none"),
    "only V e4m3, offset corrected": dict(qk="exact", p_fmt="none"),
    "only V e4m3, offset mean(V) (before)": dict(qk="exact", p_fmt="none", **BEFORE),
    "without Q·Kᵀ codes (exact scores)": dict(qk="exact"),
    "without P rounding": dict(p_fmt="none"),
    "without V rounding": dict(v_fmt="none"),
    "row sum of the rounded P": dict(l_from="p8"),
    "before + one FP8-MMA accumulator (fp22 model)": dict(acc="fp22", **BEFORE),
    "now + one FP8-MMA accumulator (fp22 model; the kernels)": dict(acc="fp22"),
    "now + per-tile accumulator, fp32 add (fp22 model)": dict(acc="fp22_tile"),
    "only the accumulator (fp22 model, one accumulator; nothing rounded)": dict(qk="exact", p_fmt="none",
                                                                               v_fmt="none", acc="fp22"),
    "P and V in fp16 (SageAttention 1 style), INT8 Q·Kᵀ": dict(p_fmt="fp16", v_fmt="fp16"),
    "P fp16, V e4m3": dict(p_fmt="fp16"),
    "P e4m3, V fp16": dict(v_fmt="fp16"),
}


def shares(rows: list) -> dict:
    """Each source's share of the squared rel. L2 (errors of independent sources add in quadrature), now
    and before, from the rows "only …" against the full reference."""
    err = {r["config"]: r["rel_l2"] for r in rows if r["acc_bits"] in (None, 13)}
    out = {}
    for when, total, v_row in (("now", "reference now", "only V e4m3, offset corrected"),
                               ("before", "reference before", "only V e4m3, offset mean(V)")):
        tot = next((e for c, e in err.items() if c.startswith(total)), None)
        parts = {"Q·Kᵀ INT8": "only Q·Kᵀ INT8", "P e4m3": "only P e4m3", "V e4m3": v_row,
                 "FP8-MMA accumulator (fp22 model)": "only the accumulator"}
        got = {n: next((e for c, e in err.items() if c.startswith(pre)), None) for n, pre in parts.items()}
        if tot:
            out[when] = dict(total_rel_l2=tot, **{n: round((e / tot) ** 2, 3) for n, e in got.items() if e is not None})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="attention_error_sources_cpu.json")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--length", type=int, default=32760)
    ap.add_argument("--queries", type=int, default=256, help="query rows per head that are evaluated")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--k-offset", type=float, default=3.0, help="std of the per-head constant added to K")
    ap.add_argument("--acc-bits", type=int, nargs="+", default=[13])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="comma-separated config-name prefixes (default: all)")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    H, L, D = args.heads, args.length, args.head_dim
    q, k, v = flat_inputs(H, L, D, args.k_offset, args.seed)
    qh, kh, vh = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))      # (H, L, D)
    qh = qh[:, :: max(1, L // args.queries)][:, : args.queries].contiguous()
    scale = 1.0 / math.sqrt(D)
    truth = exact_attention(qh, kh, vh, scale)
    rows = []
    for name, sw in CONFIGS.items():
        if args.only and not any(name.startswith(p) for p in args.only.split(",")):
            continue
        for bits in (args.acc_bits if sw.get("acc", "exact") != "exact" else [None]):
            t0 = time.time()
            out = emulate(qh, kh, vh, scale, **{**KERNEL, **sw}, acc_bits=bits or 13)
            err = rel_l2(out, truth)
            rows.append(dict(config=name, acc_bits=bits, rel_l2=round(err, 5),
                             vs_bf16_output=round(rel_l2(out, truth.bfloat16().double()), 5)))
            print(f"{err * 100:6.3f} %  {name}" + (f"  [acc bits {bits}]" if bits else "")
                  + f"  ({time.time() - t0:.0f} s)", flush=True)
    lib = quant_attention_reference(qh.transpose(0, 1)[None], k, v)[0].transpose(0, 1)   # the library's reference
    rows.append(dict(config="attention_ref.quant_attention_reference (the library)", acc_bits=None,
                     rel_l2=round(rel_l2(lib.double(), truth), 5)))
    print(f"{rows[-1]['rel_l2'] * 100:6.3f} %  {rows[-1]['config']}")
    bf16_out = rel_l2(truth.bfloat16().double(), truth)
    result = dict(machine=f"{platform.machine()} CPU ({torch.get_num_threads()} threads)", torch=torch.__version__,
                  command="PYTHONPATH=src python3 benchmarks/attention_error_sources.py " + " ".join(argv or sys.argv[1:]),
                  inputs=dict(B=1, H=H, L=L, D=D, queries_per_head=qh.shape[1], k_offset_std=args.k_offset,
                              seed=args.seed, dtype="bf16 values", note="q, k, v ~ N(0,1); K + one constant per head"),
                  truth="fp64 softmax attention on the same inputs", bf16_output_rounding_rel_l2=round(bf16_out, 5),
                  rows=rows, share_of_squared_error=shares(rows))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
