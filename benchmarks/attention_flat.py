"""8-bit attention on flat attention (issue #23 item 5), on a GPU: error before / after the V offset correction, and its cost.

    PYTHONPATH=src python3 benchmarks/attention_flat.py --out attention_flat.json

Inputs: q, k, v ~ N(0, 1) bf16, (B, L, H, D) = (1, 32760, 40, 128), plus one constant per head added to K
(``--k-offset`` × N(0, 1)). Every row spreads its weight over ~L/e keys, so the output is a small
average of V rows and every rounding of P or V shows in it (``attention_error_sources.py`` splits the
error on the CPU).

Reported (JSON): rel. L2 / cos of each kernel (Gluon and Triton) against cuDNN bf16 SDPA and fp32 SDPA,
"after" (the library: output offset v_offset) and "before" (the same kernel and codes with the old
offset mean(V), built here from ``kv_stats_triton``); the reference (``attention_ref``, exact fp32 order of
P·V) on every ``--row-step``-th query, against the kernels on the same rows (what the tensor cores'
accumulation adds); times (CUDA events, median of ``--reps``): the whole call, the K/V pass with and
without the ``_v_offset_kernel`` launch (the correction's only new kernel), that launch alone, the
attention kernel alone, cuDNN. The attention kernels are unchanged by the correction (one more pointer).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench_attention import kernel_only, timed
from dvdquant.kernels import attention_triton as at
from dvdquant.kernels.attention_ref import LOG2E, kv_stats, quant_attention_reference, quantize_kv_reference


DEV = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: a smoke run under TRITON_INTERPRET=1, no timings


def flat_inputs(B, H, L, D, k_offset, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q, k, v = (torch.randn(B, L, H, D, device=DEV, generator=g, dtype=torch.bfloat16) for _ in range(3))
    k = (k.float() + k_offset * torch.randn(1, 1, H, 1, device=DEV, generator=g)).bfloat16()
    return q, k, v


def sdpa(q, k, v, backend, dtype):
    qt, kt, vt = (t.transpose(1, 2).to(dtype) for t in (q, k, v))
    with sdpa_kernel(backend if DEV == "cuda" else SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)


def metrics(o, r):
    o, r = o.float().flatten(), r.float().flatten()
    return dict(rel_l2=round(float((o - r).norm() / r.norm()), 5),
                cos=round(float(torch.nn.functional.cosine_similarity(o, r, dim=0)), 6))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="attention_flat.json")
    ap.add_argument("--shape", default="1,40,32760,128", help="B,H,L,D")
    ap.add_argument("--k-offset", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--row-step", type=int, default=16, help="reference on every n-th query (memory)")
    args = ap.parse_args(argv)
    B, H, L, D = (int(x) for x in args.shape.split(","))
    q, k, v = flat_inputs(B, H, L, D, args.k_offset, args.seed)
    cudnn = sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION, torch.bfloat16)
    fp32 = sdpa(q, k, v, SDPBackend.EFFICIENT_ATTENTION, torch.float32)
    c = LOG2E / math.sqrt(D)
    bn = 128 if D == 128 else 64
    kv = at.quantize_kv(k, v, "int8", bn)
    kv_before = dataclasses.replace(kv, v_offset=at.kv_stats_triton(k, v)[1])   # the old output offset mean(V)
    cfg = at.LAUNCH_BY_HEAD_DIM[D]
    use_tma = at.default_use_tma(q.device, D)

    def triton_run(kvx):
        return kernel_only(q, kvx, "int8", cfg["block_m"], bn, cfg["num_warps"], cfg["num_stages"], use_tma)

    runs = {"triton": (triton_run(kv), triton_run(kv_before))}
    if at.gluon_available() and at._attention_gluon.gluon_supported(q, L, bn):
        g = at._attention_gluon
        runs["gluon"] = (lambda: g.attend_gluon(q, kv, c, "int8")[0], lambda: g.attend_gluon(q, kv_before, c, "int8")[0])
    rows = slice(None, None, args.row_step)
    ref = quant_attention_reference(q[:, rows].float(), k, v)         # the library's reference, fp32 P·V order
    kvr = quantize_kv_reference(k, v, "int8", bn)                       # its offsets: before − after, (B, 1, H, D)
    ref_before = ref + (kv_stats(k, v)[1] - kvr.v_offset)[:, None]
    del kvr
    res = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter smoke run)", torch=torch.__version__, triton=at.triton.__version__,
               shape=dict(B=B, H=H, L=L, D=D), k_offset_std=args.k_offset, seed=args.seed,
               bf16_cudnn_vs_fp32=metrics(cudnn, fp32),
               reference_rows=dict(row_step=args.row_step,
                                   after_vs_cudnn=metrics(ref, cudnn[:, rows]), after_vs_fp32=metrics(ref, fp32[:, rows]),
                                   before_vs_cudnn=metrics(ref_before, cudnn[:, rows]),
                                   before_vs_fp32=metrics(ref_before, fp32[:, rows])),
               kernels={})
    full = at.quant_attention(q, k, v, impl="triton")
    for name, (after, before) in runs.items():
        oa, ob = after(), before()
        res["kernels"][name] = dict(after_vs_cudnn=metrics(oa, cudnn), after_vs_fp32=metrics(oa, fp32),
                                    before_vs_cudnn=metrics(ob, cudnn), before_vs_fp32=metrics(ob, fp32),
                                    after_vs_reference_rows=metrics(oa[:, rows], ref),
                                    before_vs_reference_rows=metrics(ob[:, rows], ref_before))
        if name == "triton":
            res["kernels"][name]["launcher_output_identical"] = bool(torch.equal(full, oa))
        if DEV == "cuda":
            res["kernels"][name]["kernel_ms"] = round(timed(after, args.reps) * 1e3, 3)
        print(name, res["kernels"][name], flush=True)
    # cost: the correction adds one tiny launch after the K/V pass (and one (D,) store per key tile inside it)
    nb = kv.k8.shape[2] // bn
    part = torch.randn(B * H, nb, D, device=DEV)
    voff = torch.empty_like(kv.v_offset)
    vm = kv_before.v_offset

    def v_offset_launch():
        at._v_offset_kernel[(B * H,)](part, vm, kv.v_scale, voff, L, nb, D=D, TILES=at.V_OFFSET_TILES, num_warps=4)

    def kv_pass_before():   # quantize_kv without the v_offset launch (the K/V kernel still stores its tile sums)
        k_mean, v_mean, v_inv = at.kv_stats_triton(k, v)
        lkp = nb * bn
        k8 = torch.empty(B, H, lkp, D, device=DEV, dtype=torch.int8)
        ks = torch.empty(B, H, lkp, device=DEV, dtype=torch.float32)
        v8t = torch.empty(B, H, D, lkp, device=DEV, dtype=torch.float8_e4m3fn)
        at._quant_kv_kernel[(nb, B * H)](k, v, k_mean, v_mean, v_inv, k8, ks, v8t, part, L, lkp, H, k.stride(0),
                                         k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), D=D,
                                         BLOCK_N=bn, QK_INT8=True, QMAX_QK=127.0, EXACT_FP8=DEV == "cpu", num_warps=4)
        return 1.0 / v_inv
    timed_ = timed if DEV == "cuda" else (lambda fn, reps: (fn(), float("nan"))[1])
    res["times_ms"] = dict(
        call_auto=round(timed_(lambda: at.quant_attention(q, k, v), args.reps) * 1e3, 3),
        kv_pass=round(timed_(lambda: at.quantize_kv(k, v, "int8", bn), args.reps) * 1e3, 3),
        kv_pass_without_v_offset_launch=round(timed_(kv_pass_before, args.reps) * 1e3, 3),
        v_offset_kernel=round(timed_(v_offset_launch, args.reps) * 1e3, 4),
        cudnn_bf16=round(timed_(lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION, torch.bfloat16), args.reps) * 1e3, 3))
    t = res["times_ms"]
    t["v_offset_share_of_call"] = round(t["v_offset_kernel"] / t["call_auto"], 5)
    t["kv_pass_delta_share_of_call"] = round((t["kv_pass"] - t["kv_pass_without_v_offset_launch"]) / t["call_auto"], 5)
    res["command"] = "PYTHONPATH=src python3 benchmarks/attention_flat.py " + " ".join(argv or sys.argv[1:])
    print(json.dumps({k: res[k] for k in ("bf16_cudnn_vs_fp32", "reference_rows", "times_ms")}, indent=1))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
