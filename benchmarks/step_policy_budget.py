"""Budget asked vs budget reached: dvdquant's step policy with an automatic threshold on the embedded model.

The embedded model quantized W4A4 (DVD-Quant, 8-bit attention) with ``StepPolicyConfig(budget=b)`` (other
fields default), sampled by dvdquant's sampler (CFG batched) for ``--prompts`` captions in one batch, per
budget. The policy decides per sample, so each prompt has its own schedule and its own realised mean step
cost (relative to an A8 step, from the device's cost table, ``dvdquant.algorithms.step_policy.COSTS``).
Reported per budget: the mean, min and max over prompts of the realised cost, the share of skipped steps,
each prompt's schedule (``S`` skip, ``4``, ``8``) and the wall time. Writes a JSON.

    python benchmarks/step_policy_budget.py --prompts 16 --steps 20 --budgets 0.6 0.8 \
        --out docs/results/step_policy_budget_cpu.json
    python benchmarks/step_policy_budget.py --prompts 8 --steps 50 --budgets 0.5 --costs cuda --out …  # a GPU schedule
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import dvdquant
from dvdquant.algorithms.step_policy import COSTS, SKIP
from dvdquant.api import set_step_policy
from dvdquant.config import StepPolicyConfig
from dvdquant.data.factors import make_caption, sample_combinations
from dvdquant.models.embedded import load_embedded
from dvdquant.pipeline.generate import generate


def run_budget(model, captions: list, steps: int, seed: int, budget: float, max_skips: int = 2,
               costs: str = "device") -> dict:
    tracker = set_step_policy(model.transformer, StepPolicyConfig(budget=budget, max_skips=max_skips))
    if costs != "device":
        tracker.policy.costs = COSTS[costs]
    t0 = time.perf_counter()
    generate(model, captions, seed=seed, steps=steps, progress=False)
    seconds = time.perf_counter() - t0
    pol = tracker.policy
    per = [pol.mean_cost(i) for i in range(len(captions))]
    scheds = ["".join("S" if d[i] == SKIP else str(d[i]) for d in pol.decisions) for i in range(len(captions))]
    skipped = sum(s.count("S") for s in scheds) / (len(scheds) * steps)
    return {"budget": budget, "reached_mean": sum(per) / len(per), "reached_min": min(per), "reached_max": max(per),
            "skipped_share": skipped, "per_prompt": per, "schedules": scheds,
            "cost_table": {"skip": pol.cost(SKIP), "a4": pol.cost(pol.config.low_bits), "a8": 1.0,
                           "source": (pol.costs or pol.device_costs).source},
            "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.8])
    ap.add_argument("--max-skips", type=int, default=2, help="StepPolicyConfig.max_skips (default: %(default)s)")
    ap.add_argument("--costs", default="device", choices=["device", *COSTS],
                    help="cost table the budget is counted in: the device's the model runs on, or another's "
                         "(cuda: plan a GPU schedule on the CPU; default: %(default)s)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_embedded()
    dvdquant.quantize_(model.transformer, dvdquant.DVDQuantConfig(w_bits=4, a_bits=4))
    captions = [make_caption(f) for f in sample_combinations(args.prompts, seed=args.seed)]
    rows = []
    res = {"model": "embedded W4A4 (DVD-Quant, 8-bit attention)", "steps": args.steps, "prompts": captions,
           "policy": f"StepPolicyConfig(budget=b, max_skips={args.max_skips}), other fields default",
           "costs": args.costs, "rows": rows,
           "machine": f"{platform.machine()} torch {torch.__version__} threads {torch.get_num_threads()}",
           "command": "python benchmarks/step_policy_budget.py " + " ".join(
               f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
               for k, v in vars(args).items())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for b in args.budgets:                          # the JSON is rewritten after each budget
        rows.append(run_budget(model, captions, args.steps, args.seed, b, args.max_skips, args.costs))
        r = rows[-1]
        print(f"budget {b:.2f}: reached {r['reached_mean']:.3f} (prompts {r['reached_min']:.3f}–{r['reached_max']:.3f}), "
              f"skipped {r['skipped_share']:.0%}, {r['seconds']} s", flush=True)
        args.out.write_text(json.dumps(res, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
