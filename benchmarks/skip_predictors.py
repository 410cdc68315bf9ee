"""Which signal, available before a step runs, predicts how much that step changes? (issue 25, item 2)

A step cache skips step t when a cheap predictor says the step would change little. This measures,
on the embedded model (CFG batched as in dvdquant's sampler), how well each candidate ranks the
steps by their real change:

* ``teacache_temb``: relative L1 change of the timestep projection (TeaCache's modulated input for Wan);
* ``teacache_modulated``: relative L1 change of block 0's modulated, normalised input (TeaCache's
  input for the DiTs whose first block it hooks);
* ``firstblock_residual``: FirstBlockCache's criterion, mean|r0_t − r0_{t−1}| / mean|r0_{t−1}| of block 0's
  residual (costs block 0);
* ``magcache_law``: MagCache's |1 − Π ratio| for one step, |1 − ρ_t|, with ρ_t the per-step mean ratio
  ‖R_t‖ / ‖R_{t−1}‖ of the blocks' residual calibrated on other prompts (``--calibration``);
* ``last_output_change``: the previous step's measured output change (what δ-GBS already has).

Targets, per prompt and step t: ``output_change`` = Σ|F_t − F_{t−1}| / Σ|F_{t−1}| of the transformer
output (both CFG halves; δ-GBS's indicator), and ``residual_change`` = Σ|R_t − R_{t−1}| / Σ|R_{t−1}|
of the blocks' residual R = out(last block) − in(first block) (the relative error of serving step t
with step t−1's residual, as MagCache/TeaCache do). Reported: Spearman rank correlation pooled over
(prompt, step) and the mean over prompts of the per-trajectory correlation, over steps 2…S−1 (where
every predictor exists). Writes a JSON.

    python benchmarks/skip_predictors.py --prompts 8 --steps 20 --out runs/skip_predictors.json
    python benchmarks/skip_predictors.py --prompts 8 --steps 20 --bits W4A4 --out runs/skip_predictors_w4a4.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import dvdquant
from dvdquant.data.factors import make_caption, sample_combinations
from dvdquant.models.embedded import load_embedded
from dvdquant.pipeline import generate

PREDICTORS = ("teacache_temb", "teacache_modulated", "firstblock_residual", "magcache_law", "last_output_change")
TARGETS = ("output_change", "residual_change")


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().sum() / b.abs().sum().clamp_min(1e-12))


class Recorder:
    """Per transformer call (one per step: CFG batched): the tensors the predictors and targets need."""

    def __init__(self, transformer) -> None:
        self.calls: list = []
        cur: dict = {}
        blocks = transformer.blocks

        def emb_hook(m, args, out):               # (temb, timestep_proj, text, image)
            cur["temb"] = out[1].detach().float().clone()

        def b0_pre(m, args, kwargs):
            cur["in0"] = (args[0] if args else kwargs["hidden_states"]).detach().float().clone()

        def b0_post(m, args, kwargs, out):
            cur["out0"] = out.detach().float().clone()

        def attn_pre(m, args, kwargs):
            cur["mod0"] = (args[0] if args else kwargs["hidden_states"]).detach().float().clone()

        def last_post(m, args, kwargs, out):
            cur["outL"] = out.detach().float().clone()

        def model_post(m, args, kwargs, out):
            cur["F"] = (out[0] if isinstance(out, tuple) else out.sample).detach().float().clone()
            self.calls.append(dict(cur))
            cur.clear()

        transformer.condition_embedder.register_forward_hook(emb_hook)
        blocks[0].register_forward_pre_hook(b0_pre, with_kwargs=True)
        blocks[0].register_forward_hook(b0_post, with_kwargs=True)
        blocks[0].attn1.register_forward_pre_hook(attn_pre, with_kwargs=True)
        blocks[-1].register_forward_hook(last_post, with_kwargs=True)
        transformer.register_forward_hook(model_post, with_kwargs=True)


def _sample(call: dict, rows: list) -> dict:
    return {k: v[rows] for k, v in call.items()}


def _mag_ratio(r: torch.Tensor, r_prev: torch.Tensor) -> float:
    return float((r.norm(dim=-1) / (r_prev.norm(dim=-1) + 1e-8)).mean())


def trajectories(model, captions: list, steps: int, seed: int) -> list:
    """Per prompt, per step, the sample's tensors (both CFG halves)."""
    rec = Recorder(model.transformer)
    generate(model, captions, seed=seed, steps=steps, progress=False)
    b = len(captions)
    assert len(rec.calls) == steps
    return [[_sample(c, [i, b + i]) for c in rec.calls] for i in range(b)]


def magnitude_law(trajs: list) -> list:
    """ρ_t averaged over the calibration trajectories (ρ_0 = 1)."""
    steps = len(trajs[0])
    law = [1.0]
    for t in range(1, steps):
        law.append(sum(_mag_ratio(tr[t]["outL"] - tr[t]["in0"], tr[t - 1]["outL"] - tr[t - 1]["in0"])
                       for tr in trajs) / len(trajs))
    return law


def step_rows(traj: list, law: list) -> list:
    """Predictors and targets for steps 1…S−1 of one trajectory."""
    rows = []
    for t in range(1, len(traj)):
        c, p = traj[t], traj[t - 1]
        res, res_prev = c["outL"] - c["in0"], p["outL"] - p["in0"]
        r0, r0_prev = c["out0"] - c["in0"], p["out0"] - p["in0"]
        rows.append({
            "step": t,
            "output_change": _rel_l1(c["F"], p["F"]),
            "residual_change": _rel_l1(res, res_prev),
            "teacache_temb": _rel_l1(c["temb"], p["temb"]),
            "teacache_modulated": _rel_l1(c["mod0"], p["mod0"]),
            "firstblock_residual": float((r0 - r0_prev).abs().mean() / r0_prev.abs().mean().clamp_min(1e-12)),
            "magcache_law": abs(1.0 - law[t]),
            "last_output_change": rows[-1]["output_change"] if rows else float("nan"),
        })
    return rows


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x, stable=True)
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=x.dtype)
    for v in torch.unique(x):                      # average rank of ties
        m = x == v
        if m.sum() > 1:
            r[m] = r[m].mean()
    return r


def spearman(a: list, b: list) -> float:
    x, y = _ranks(torch.tensor(a, dtype=torch.float64)), _ranks(torch.tensor(b, dtype=torch.float64))
    x, y = x - x.mean(), y - y.mean()
    den = (x.norm() * y.norm()).item()
    return float((x * y).sum() / den) if den > 0 else float("nan")


def correlations(per_prompt: list) -> dict:
    """{target: {predictor: {"pooled": ρ, "per_prompt_mean": ρ̄, "per_prompt_min": min ρ}}} over steps ≥ 2."""
    out = {}
    for target in TARGETS:
        out[target] = {}
        for pred in PREDICTORS:
            pooled_a, pooled_b, per = [], [], []
            for rows in per_prompt:
                rows = [r for r in rows if r["step"] >= 2]
                a, b = [r[pred] for r in rows], [r[target] for r in rows]
                pooled_a += a
                pooled_b += b
                per.append(spearman(a, b))
            out[target][pred] = {"pooled": spearman(pooled_a, pooled_b),
                                 "per_prompt_mean": sum(per) / len(per), "per_prompt_min": min(per)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--calibration", type=int, default=4, help="prompts (another seed) for MagCache's ratio law")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bits", default="fp", help="fp, or W4A4 / W4A8 / W8A8 (DVD-Quant, 8-bit attention)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = load_embedded()
    if args.bits != "fp":
        w, a = int(args.bits[1]), int(args.bits[3])
        dvdquant.quantize_(model.transformer, dvdquant.DVDQuantConfig(w_bits=w, a_bits=a))
    captions = [make_caption(f) for f in sample_combinations(args.prompts, seed=args.seed)]
    cal = [make_caption(f) for f in sample_combinations(args.calibration, seed=args.seed + 1000)]
    law = magnitude_law(trajectories(model, cal, args.steps, seed=args.seed + 1000))
    per_prompt = [step_rows(tr, law) for tr in trajectories(model, captions, args.steps, seed=args.seed)]
    res = {"model": "embedded", "bits": args.bits, "steps": args.steps, "prompts": captions,
           "calibration_prompts": cal, "magnitude_law": law, "correlations": correlations(per_prompt),
           "rows": per_prompt, "seconds": round(time.perf_counter() - t0, 1),
           "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}".strip(),
           "command": "python benchmarks/skip_predictors.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    for target, preds in res["correlations"].items():
        print(f"{target}:")
        for p, v in preds.items():
            print(f"  {p:<22} pooled ρ {v['pooled']:+.3f}   per-prompt mean ρ {v['per_prompt_mean']:+.3f}"
                  f" (min {v['per_prompt_min']:+.3f})")
    print(f"{res['seconds']} s -> {args.out}")


if __name__ == "__main__":
    main()
