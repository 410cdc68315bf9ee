"""Context-parallel (sequence-parallel) inference of a quantized video DiT: bf16 vs dvdquant on N GPUs.

Launched with torchrun, one process per GPU; diffusers' context parallelism (Ulysses by default)
splits the 32,760 tokens of a Wan 2.1 14B step (480×832, 81 frames) over the ranks:

    torchrun --nproc_per_node 2 benchmarks/bench_cp.py --out results/
    torchrun --nproc_per_node 2 benchmarks/bench_cp.py --device cpu --model tiny --out /tmp/cp   # CPU dry run

Two parts, every rank writing ``<out>/cp_rank<r>.json`` (rank 0 prints a markdown summary):

1. **numerics** on a smaller Wan (``--check-model``): for bf16, W4A4 on the FP8 path (rotation 128,
   per-token scales), W4A8 on the same weights and W4A4 with ARQ per-channel auto-scaling
   (emulated path, Λ_t all-reduced over the ranks), the relative L2 distance between the
   context-parallel output and the same model's one-device output on the same rank; beside it,
   the one-device distance between the FP8 path and the exact emulated path (the FP8 path's own
   tolerance). Also whether sharded quantization (``quantize_sharded``, every rank assembling)
   gives the same tensors as ``quantize_`` in one process on this device type.
2. **speed** on the full-size model (``--model``, default ``wan14b``, random bf16 weights): one
   denoising step, context-parallel, bf16 vs W4A4 / W4A8 (``fp8`` backend); median of
   ``--steps`` CUDA-event timings after one warm-up; peak memory per GPU; time of the sharded
   quantization (each rank quantizes its half of the layers, then the halves are exchanged).
   Optionally (``--full-ref``) the context-parallel output against the one-device output at
   full size.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dvdquant.errors import DVDQuantError

log = logging.getLogger("bench_cp")
CP = {"kind": "ulysses"}          # --cp: "ulysses" or "ring" (set in main)


def enable_cp(model):
    """diffusers context parallelism over every rank, Ulysses or ring (``--cp``)."""
    from dvdquant.distributed import enable_context_parallel
    if CP["kind"] == "ring":
        return enable_context_parallel(model, ring_degree=dist.get_world_size())
    return enable_context_parallel(model)


# ------------------------------------------------------------------------------------ models
def build(which: str, device, seed: int = 0):
    """(model in bf16 on ``device``, latent, kwargs); same seed → same weights and inputs on every rank."""
    from diffusers import WanTransformer3DModel
    if which == "wan14b":
        cfg, lat_shape, text = {}, (1, 16, 21, 60, 104), (1, 512, 4096)     # 480×832×81 → 32,760 tokens
    elif which == "wan-small":
        cfg = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=4)
        lat_shape, text = (1, 16, 9, 30, 52), (1, 512, 4096)                 # 3,510 tokens
    elif which == "tiny64":                                                 # head_dim 64: the 8-bit attention runs
        cfg = dict(num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=4, text_dim=32,
                   freq_dim=32, ffn_dim=512, num_layers=2, rope_max_seq_len=32)
        lat_shape, text = (1, 4, 4, 16, 16), (1, 300, 32)                     # 256 video tokens, 300 text
    elif which == "tiny":
        cfg = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, text_dim=32,
                   freq_dim=32, ffn_dim=256, num_layers=2, rope_max_seq_len=32)
        lat_shape, text = (1, 4, 2, 8, 8), (1, 8, 32)
    else:
        raise SystemExit(f"unknown model {which!r}")
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**cfg).eval()
    finally:
        torch.set_default_dtype(old)
    if CP["kind"] == "ring" and torch.device(device).type == "cuda":
        model.set_attention_backend("_native_cudnn")     # ring merges chunks by their lse: SDPA "native" gives none
    g = torch.Generator().manual_seed(seed + 1)
    lat = torch.randn(*lat_shape, generator=g).to(device, torch.bfloat16)
    kw = dict(timestep=torch.tensor([500], device=device),
              encoder_hidden_states=torch.randn(*text, generator=g).to(device, torch.bfloat16))
    return model, lat, kw


def forward(model, lat, kw):
    with torch.inference_mode():
        return model(lat, return_dict=False, **kw)[0]


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, steps: int) -> float:
    """Median wall time of ``fn`` (CUDA events on GPU), after one warm-up call."""
    fn()
    sync(device)
    ts = []
    for _ in range(steps):
        if torch.device(device).type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    dist.barrier()
    return sorted(ts)[len(ts) // 2]


def peak_gb(device) -> float:
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if torch.device(device).type == "cuda" else 0.0


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def weight_gb(m) -> float:
    return round(sum(t.numel() * t.element_size() for t in m.state_dict().values()) / 1e9, 2)


def fast_config(attention="none"):
    """W4A4 on the FP8 path: Hadamard-128 rotation, per-token scales; A8 steps on the e4m3 grid."""
    import dvdquant
    return dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, rotation_block=128, auto_scale="none",
                                   a8_format="fp8_e4m3", attention=attention)


def attention_modes() -> list:
    """8-bit attention modes this checkout offers (dvdquant.nn.attention), besides "none"."""
    try:
        from dvdquant.nn import attention as qattn
    except ImportError:
        return []
    return ["int8"] if "int8" in qattn.MODES else []


def guarded(res: dict, key: str, fn):
    """Run one measurement; a failure is recorded under ``key + '_error'`` and the run goes on."""
    try:
        return fn()
    except (RuntimeError, ValueError, NotImplementedError, AssertionError, ImportError, DVDQuantError) as e:
        log.error("%s failed: %s", key, e)
        res[key + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return None


# ------------------------------------------------------------------------------------ part 1
def numerics(which: str, device, backend: str) -> dict:
    import dvdquant
    from dvdquant.distributed import disable_context_parallel, quantize_sharded
    res = {"model": which}
    m, lat, kw = build(which, device)
    ref = forward(m, lat, kw)

    def bf16_cp():                                   # ring on CPU: no lse-returning bf16 backend → recorded error
        enable_cp(m)
        res["bf16_cp_vs_single"] = rel(forward(m, lat, kw), ref)
        disable_context_parallel(m)
    guarded(res, "bf16_cp", bf16_cp)
    del m
    variants = {"w4a4_fp8": (fast_config(), backend, None), "w4a8_fp8": (fast_config(), backend, 8),
                "w4a4_per_channel": (dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, attention="none"), "emulated", None)}
    for mode in attention_modes():
        variants[f"w4a4_fp8_attn_{mode}"] = (fast_config(mode), backend, None)
    for name, (cfg, be, bits) in variants.items():
        def one():
            m, lat, kw = build(which, device)
            t = time.perf_counter()
            dvdquant.quantize_(m, cfg)
            res[f"{name}_quantize_s"] = round(time.perf_counter() - t, 2)
            state = dvdquant.get_state(m)
            state.a_bits = bits
            exact = None
            if cfg.attention == "none":                 # linear layers alone: the exact path is emulated
                dvdquant.set_backend(m, "emulated")
                exact = forward(m, lat, kw)
            dvdquant.set_backend(m, be)                 # every variant on its own backend (attention rows too)
            single = forward(m, lat, kw)
            if exact is not None:
                res[f"{name}_single_vs_emulated"] = rel(single, exact)   # the one-device tolerance
            res[f"{name}_backend"] = be
            res[f"{name}_single_repeat_vs_single"] = rel(forward(m, lat, kw), single)   # run-to-run determinism
            enable_cp(m)
            res[f"{name}_cp_vs_single"] = rel(forward(m, lat, kw), single)
            res[f"{name}_vs_bf16"] = rel(single, ref)
            if cfg.auto_scale == "per_channel":         # the same without the all-reduce of Λ_t
                group, state.process_group = state.process_group, None
                res[f"{name}_cp_no_reduce_vs_single"] = rel(forward(m, lat, kw), single)
                state.process_group = group
        guarded(res, name, one)
    # sharded quantization vs one process, on this device type

    def sharded():
        m, _, _ = build(which, device)
        dvdquant.quantize_(m, fast_config())
        one = {k: v.cpu() for k, v in m.state_dict().items()}
        del m
        m, _, _ = build(which, device)
        quantize_sharded(m, fast_config(), dst=None)
        two = m.state_dict()
        res["sharded_bit_identical"] = one.keys() == two.keys() and all(torch.equal(one[k], two[k].cpu())
                                                                         for k in one)
    guarded(res, "sharded", sharded)
    return res


# ------------------------------------------------------------------------------------ part 2
def speed(which: str, device, backend: str, steps: int, full_ref: bool) -> dict:
    import dvdquant
    from dvdquant.distributed import disable_context_parallel, quantize_sharded
    m, lat, kw = build(which, device)
    res = {"model": which, "tokens": lat[0, 0].numel() // 4,
           "params_b": round(sum(p.numel() for p in m.parameters()) / 1e9, 2), "bf16_weight_gb": weight_gb(m)}
    step = lambda: forward(m, lat, kw)                                 # noqa: E731
    ref = step() if full_ref else None
    enable_cp(m)
    reset_peak(device)
    res["bf16_cp_ms"] = time_ms(step, device, steps)
    res["bf16_cp_peak_gb"] = peak_gb(device)
    if full_ref:
        res["bf16_cp_vs_single"] = rel(step(), ref)
    disable_context_parallel(m)
    sync(device)
    dist.barrier()
    t = time.perf_counter()
    report = quantize_sharded(m, fast_config(), dst=None)              # each rank half, then exchanged
    sync(device)
    res["quantize_sharded_s"] = round(time.perf_counter() - t, 1)
    res["layers"] = len(report.layers)
    res["quant_weight_gb"] = weight_gb(m)
    dvdquant.set_backend(m, backend)
    state = dvdquant.get_state(m)
    variants = [("w4a4", 4, None), ("w4a8", 8, None)] + [(f"w4a{b}_attn_{a}", b, a) for a in attention_modes()
                                                          for b in (4, 8)]
    refs = {}
    if full_ref:
        for name, bits, attn in variants:
            state.a_bits = bits
            refs[name] = guarded(res, name + "_single", lambda: _with_attention(m, attn, step))
    enable_cp(m)
    for name, bits, attn in variants:
        state.a_bits = bits

        def measure():
            reset_peak(device)
            res[f"{name}_cp_ms"] = _with_attention(m, attn, lambda: time_ms(step, device, steps))
            res[f"{name}_cp_peak_gb"] = peak_gb(device)
            if refs.get(name) is not None:
                res[f"{name}_cp_vs_single"] = rel(_with_attention(m, attn, step), refs[name])
            res[f"{name}_speedup_vs_bf16"] = round(res["bf16_cp_ms"] / res[f"{name}_cp_ms"], 3)
        guarded(res, name, measure)
    return res


def _with_attention(model, mode, fn):
    """Run ``fn`` with dvdquant's 8-bit attention installed (``mode``) or with the model's own."""
    if mode is None:
        return fn()
    from dvdquant.nn import attention as qattn
    qattn.install_quantized_attention(model, mode)
    try:
        return fn()
    finally:
        qattn.remove_quantized_attention(model)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan14b", choices=["wan14b", "wan-small", "tiny", "tiny64", "none"],
                    help="model of the speed part ('none' skips it)")
    ap.add_argument("--check-model", default=None, help="model of the numerics part (default: wan-small on GPU, "
                    "tiny on CPU; 'none' skips it)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--full-ref", action="store_true", help="also compare CP with one device at full size")
    ap.add_argument("--cp", default="ulysses", choices=["ulysses", "ring"],
                    help="context parallelism: Ulysses (all-to-all over heads) or ring (K/V passed around; "
                    "bf16 rows then use cuDNN SDPA, which returns the log-sum-exp the ring merge needs)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args()
    CP["kind"] = args.cp
    logging.basicConfig(level=logging.WARNING)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
        backend = "fp8"
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        backend = "emulated"
    import diffusers
    out = {"rank": rank, "world": world, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "device": torch.cuda.get_device_name(device) if args.device == "cuda" else "cpu",
           "cp": f"{args.cp} {world}", "backend": backend}
    check = args.check_model or ("wan-small" if args.device == "cuda" else "tiny")
    t0 = time.perf_counter()
    if check != "none":
        out["numerics"] = numerics(check, device, backend)
        out["numerics_s"] = round(time.perf_counter() - t0, 1)
        if rank == 0:
            print(json.dumps(out["numerics"]), flush=True)
    reset_peak(device)
    if args.model != "none":
        out["speed"] = speed(args.model, device, backend, args.steps, args.full_ref)
    out["total_s"] = round(time.perf_counter() - t0, 1)
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"cp_rank{rank}.json").write_text(json.dumps(out, indent=2))
    dist.barrier()
    if rank == 0 and "speed" in out:
        s = out["speed"]
        print(f"{s['model']} ({s['tokens']} tokens), {world} ranks, {out['cp']}, {out['device']}")
        cols = ["bf16"] + [k[:-6] for k in s if k.endswith("_cp_ms") and not k.startswith("bf16")]
        print("| " + " | ".join(["step"] + cols) + " |")
        print("|" + "---|" * (len(cols) + 1))
        print("| ms, median of %d | " % args.steps + " | ".join(f"{s.get(c + '_cp_ms', float('nan')):.1f}" for c in cols) + " |")
        print("| peak GB, rank 0 | " + " | ".join(str(s.get(c + "_cp_peak_gb")) for c in cols) + " |")
    if rank == 0:
        print(json.dumps(out, indent=1), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
