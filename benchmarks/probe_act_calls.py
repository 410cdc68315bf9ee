"""Which activation-quantization calls one quantized denoising step makes, and what each costs alone.

    PYTHONPATH=src python benchmarks/probe_act_calls.py --model wan14b --out DIR

Why: the step profile (bench_step.py) reports the activation kernel's total time per step. This
records every call of the fused kernel during one eager W4A4 step of the full-size model (random
weights, as bench_step.py builds it): input shape, dtype, strides, bits, rotation and scale layout,
with the count of each kind, then times each kind standalone (``do_bench`` median) so that the
step's total can be compared with count × standalone time. Writes ``act_calls_<model>.json``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    import dvdquant
    from bench_step import build
    from dvdquant.kernels import fp8 as fp8mod
    from triton.testing import do_bench
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wan14b")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        m, lat, kw = build(args.model)
    torch.set_default_dtype(torch.float32)
    lat, kw = lat.cuda(), {k: v.cuda() for k, v in kw.items()}
    dvdquant.quantize_(m, dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, rotation_block=128, auto_scale="none",
                                                  attention="none"))
    dvdquant.set_backend(m, "fp8")
    calls: collections.Counter = collections.Counter()
    inputs: dict = {}
    real = fp8mod.act_quant

    def recording(x, **kwa):
        h = kwa.get("h_block")
        key = (tuple(x.shape), str(x.dtype), tuple(x.stride()), kwa.get("bits"), kwa.get("fmt"),
               None if h is None else tuple(h.shape), kwa.get("block"), str(kwa.get("codes_dtype")),
               json.dumps(kwa.get("config")))
        calls[key] += 1
        inputs.setdefault(key, (x.detach().clone(), dict(kwa)))
        return real(x, **kwa)
    fp8mod.act_quant = recording
    with torch.inference_mode():
        m(lat, return_dict=False, **kw)
    fp8mod.act_quant = real
    rows = []
    for key, n in calls.most_common():
        x, kwa = inputs[key]
        kwa = {k: v for k, v in kwa.items() if k not in ("nonfinite_flag", "flag_id")}
        ms = do_bench(lambda: real(x, **kwa), warmup=10, rep=40, return_mode="median")
        rows.append({"shape": key[0], "dtype": key[1], "stride": key[2], "bits": key[3], "fmt": key[4],
                     "h_block": key[5], "block": key[6], "codes_dtype": key[7], "config": key[8], "calls": n,
                     "ms_each": ms, "ms_total": ms * n})
        print(json.dumps(rows[-1]), flush=True)
    print(f"sum of count x standalone: {sum(r['ms_total'] for r in rows):.1f} ms over {sum(calls.values())} calls")
    with open(os.path.join(args.out, f"act_calls_{args.model}.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
