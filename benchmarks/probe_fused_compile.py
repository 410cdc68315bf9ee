"""Probe: how far fused and unfused Q/K/V projections drift apart under torch.compile (GPU).

Eager, the fused projections give the unfused outputs bit for bit (tests/test_kernels_gpu.py). Under
torch.compile the two models are different graphs, and inductor may fuse and round the glue after the
projections (QK-norm, RoPE) differently. This prints, for a tiny W4A4 transformer on the fp8 path, the
relative L2 distance and the share of differing outputs between: eager unfused vs compiled unfused (how
much compiling alone moves the bits), compiled fused vs compiled unfused, eager fused vs eager unfused.

    PYTHONPATH=src python3 benchmarks/probe_fused_compile.py --model hunyuan --out probe.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def distance(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    return {"rel_l2": float((a - b).norm() / b.norm()), "differing": float((a != b).float().mean()),
            "max_abs": float((a - b).abs().max())}


def main() -> None:
    import dvdquant
    from tiny_models import tiny_hunyuan, tiny_wan
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="hunyuan", choices=["hunyuan", "wan"])
    ap.add_argument("--out", default="probe_fused_compile.json")
    args = ap.parse_args()
    m, inputs = tiny_wan(head_dim=64) if args.model == "wan" else tiny_hunyuan(head_dim=64)
    dvdquant.quantize_(m, dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, rotation_block=64, attention="none"))
    m = m.to("cuda", torch.bfloat16).eval()
    inputs = {k: (v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.to("cuda")) for k, v in inputs.items()}
    inputs["hidden_states"] = inputs["hidden_states"].repeat(1, 1, 1, 2, 2)
    outs = {}
    with torch.no_grad():
        for fused in (False, True):
            dvdquant.set_backend(m, "fp8", fuse_projections=fused)
            outs["eager", fused] = m(**inputs, return_dict=False)[0]
            torch._dynamo.reset()
            outs["compiled", fused] = torch.compile(m)(**inputs, return_dict=False)[0]
    res = {"model": args.model, "device": torch.cuda.get_device_name(),
           "compiled_vs_eager_unfused": distance(outs["compiled", False], outs["eager", False]),
           "compiled_fused_vs_unfused": distance(outs["compiled", True], outs["compiled", False]),
           "eager_fused_vs_unfused": distance(outs["eager", True], outs["eager", False]),
           "compiled_fused_vs_eager_unfused": distance(outs["compiled", True], outs["eager", False])}
    print(json.dumps(res, indent=1))
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
