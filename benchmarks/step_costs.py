"""The step policy's cost table for a device: a step's time at A4, at A8 and with the tail blocks skipped.

On the embedded model quantized W4A4 (DVD-Quant, 8-bit attention, the backend of the device: simulated on
a CPU), one transformer call of a CFG batch (2 × ``--prompts`` rows) at a mid timestep, ``--reps`` calls each,
process CPU time (all threads; steadier than wall time on a shared machine), medians (block times: means):

* ``a8`` / ``a4``: the whole call with every layer at 8 / 4 activation bits;
* ``blocks_a8`` / ``blocks_a4``: the time inside the transformer blocks in those calls (hooks);
* ``skip``: the call with blocks 1…L−1 replaced by the identity and block 0 at 8 bits (what a skipped step runs).

Derived: ``overhead`` = 1 − blocks_a8 / a8 and ``low_ratio`` = blocks_a4 / blocks_a8 (the two numbers of
:data:`dvdquant.algorithms.step_policy.COSTS`), and the skip cost the model predicts from them against the one
measured. Writes a JSON.

    python benchmarks/step_costs.py --out docs/results/step_costs_embedded_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import dvdquant
from dvdquant.algorithms.step_policy import SKIP, StepCosts
from dvdquant.models.embedded import load_embedded
from dvdquant.nn.state import get_state


def _timed(fn, reps: int, after_warmup=lambda: None) -> float:
    """Median CPU time of the process (all threads) per call: steadier than wall time on a shared machine."""
    fn()                                            # warm-up
    after_warmup()
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_embedded()
    tr = model.transformer.eval()
    dvdquant.quantize_(tr, dvdquant.DVDQuantConfig(w_bits=4, a_bits=4))
    state = get_state(tr)
    cfg = model.config
    rows = 2 * args.prompts
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, tr.config.in_channels, cfg.num_frames, cfg.height, cfg.width, generator=g)
    ctx = torch.randn(rows, 12, tr.config.text_dim, generator=g)
    t = torch.full((rows,), 500.0)
    inside = [0.0]
    blocks = list(tr.blocks)
    starts = {}
    blocks[0].register_forward_pre_hook(lambda m, a: starts.__setitem__("t", time.process_time()))
    blocks[-1].register_forward_hook(lambda m, a, o: inside.__setitem__(0, inside[0] + time.process_time() - starts["t"]))

    @torch.no_grad()
    def call():
        tr(x, timestep=t, encoder_hidden_states=ctx, return_dict=False)

    res = {}
    for bits in (8, 4):
        state.a_bits = bits
        res[f"a{bits}"] = _timed(call, args.reps, lambda: inside.__setitem__(0, 0.0))
        res[f"blocks_a{bits}"] = inside[0] / args.reps
    state.a_bits = 8
    forwards = [b.forward for b in blocks[1:]]
    for b in blocks[1:]:
        b.forward = lambda hidden_states, *a, **k: hidden_states
    res["skip"] = _timed(call, args.reps)
    for b, f in zip(blocks[1:], forwards):
        b.forward = f
    overhead = 1 - res["blocks_a8"] / res["a8"]
    costs = StepCosts(overhead=overhead, low_ratio=res["blocks_a4"] / res["blocks_a8"], source="measured")
    out = {"model": "embedded W4A4 (DVD-Quant, 8-bit attention)", "rows": rows, "blocks": len(blocks),
           "seconds": {k: round(v, 4) for k, v in res.items()},
           "overhead": round(overhead, 4), "low_ratio": round(costs.low_ratio, 4),
           "skip_cost_measured": round(res["skip"] / res["a8"], 4),
           "skip_cost_model": round(costs.cost(SKIP, 8, 1 / len(blocks)), 4),
           "a4_cost_measured": round(res["a4"] / res["a8"], 4),
           "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__} "
                      f"threads {torch.get_num_threads()}".strip(),
           "command": "python benchmarks/step_costs.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
