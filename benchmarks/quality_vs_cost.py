"""Quality against compute of step-level acceleration on the embedded model (issue 25, item 4).

Rows (each at every ``--steps`` count, the same prompts and initial noise):

* ``FP`` (the reference), ``FP + MagCache τ`` and ``FP + FirstBlockCache τ`` (diffusers' hooks);
* ``W4A4`` (DVD-Quant, static A4, 8-bit attention), ``W4A4 δ-GBS δ`` (A4/A8 per step),
  ``W4A4 + MagCache τ`` and ``W4A4 + FirstBlockCache τ``;
* ``dvdquant policy, budget b``: ``StepPolicyConfig(budget=b)``, skip / A4 / A8 per step and sample.
* ``dvdquant schedule s``: ``StepPolicyConfig(schedule=s)``, a fixed schedule replayed (``--schedules``).

Per row: PSNR of each clip against the FP clip of the same prompt (mean and 95 % interval),
adherence (the shipped classifier's 'all factors right' rate), and **relative compute**: the mean over
steps of coverage × the cost of the step's precision, over the cost of an FP (bf16) step. Coverage
is the share of the transformer blocks that ran (a block counts when its ``attn1`` runs, so a block a
cache serves counts 0); precision costs come from ``COSTS`` (measured per step on a GPU, stated there).
MagCache's magnitude law is calibrated on other prompts (``--calibration``), per step count.

Clips are generated ``--batch`` prompts per call (CFG batched): diffusers' caches decide for the
whole call, so cache rows depend on the batch; ``--batch 1`` removes that. Writes a JSON and a plot.

    python benchmarks/quality_vs_cost.py --prompts 8 --steps 20,50 --out runs/qvc.json --plot docs/quality_vs_cost.png
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

import dvdquant
from dvdquant import api
from dvdquant.algorithms.step_policy import COSTS as POLICY_COSTS
from dvdquant.nn.state import get_state
from dvdquant.data.factors import make_caption, sample_combinations
from dvdquant.eval.classifier import adherence_per_clip
from dvdquant.eval.stats import mean_interval
from dvdquant.models.embedded import load_embedded
from dvdquant.numerics.video_metrics import psnr
from dvdquant.pipeline import generate

# Cost of one transformer step relative to bf16 eager: the step policy's H100 row (Wan 2.1 14B eager steps,
# stated in dvdquant.algorithms.step_policy.COSTS).
_GPU = POLICY_COSTS["cuda"]
COSTS = {"fp": 1.0, 4: _GPU.high_vs_bf16 * _GPU.low_ratio, 8: _GPU.high_vs_bf16}


class BlockCoverage:
    """Per transformer call: the share of block work that ran (a block counts, for the rows it ran on, when
    its ``attn1`` runs: a cache-served block counts 0, a sub-batch its rows) and that work's cost (rows ×
    the cost of the bits they ran at, FP: ``COSTS["fp"]``), both over a full call of the same rows."""

    def __init__(self, transformer, default_bits=None) -> None:
        self.blocks = len(transformer.blocks)
        self.state = get_state(transformer)
        self.default_bits = default_bits
        self.per_call: list = []                  # (coverage, cost) per call
        self._rows = self._ran = self._cost = 0.0
        for b in transformer.blocks:
            b.attn1.register_forward_pre_hook(self._count, with_kwargs=True)
        transformer.register_forward_pre_hook(self._start, with_kwargs=True)
        transformer.register_forward_hook(self._end)

    def _unit(self) -> float:
        if self.default_bits is None:
            return COSTS["fp"]
        bits = self.state.a_bits if self.state is not None and self.state.a_bits is not None else self.default_bits
        return COSTS[bits]

    def _count(self, m, args, kwargs):
        rows = (args[0] if args else kwargs["hidden_states"]).shape[0]
        self._ran += rows
        self._cost += rows * self._unit()

    def _start(self, m, args, kwargs):
        self._rows = (args[0] if args else kwargs["hidden_states"]).shape[0]
        self._ran = self._cost = 0.0

    def _end(self, *_):
        full = self.blocks * self._rows
        self.per_call.append((self._ran / full, self._cost / (full * COSTS["fp"])))


def _mag_config(threshold: float, steps: int, law: list):
    from diffusers.hooks import MagCacheConfig
    return MagCacheConfig(threshold=threshold, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=steps,
                          mag_ratios=law)


def _fbc_config(threshold: float):
    from diffusers.hooks import FirstBlockCacheConfig
    return FirstBlockCacheConfig(threshold=threshold)


def magnitude_law(model, prompts: list, steps: int, seed: int) -> list:
    """MagCache's per-step ratio ‖R_t‖/‖R_{t−1}‖ of the blocks' residual, averaged over ``prompts``."""
    res: list = []
    cur: dict = {}
    t = model.transformer
    h0 = t.blocks[0].register_forward_pre_hook(lambda m, a, k: cur.__setitem__("in", (a[0] if a else k["hidden_states"]).float()),
                                               with_kwargs=True)
    h1 = t.blocks[-1].register_forward_hook(lambda m, a, k, o: res.append(o.float() - cur["in"]), with_kwargs=True)
    try:
        generate(model, prompts, seed=seed, steps=steps, progress=False)
    finally:
        h0.remove()
        h1.remove()
    law = [1.0] + [float((r.norm(dim=-1) / (p.norm(dim=-1) + 1e-8)).mean()) for p, r in zip(res, res[1:])]
    return law


def run_row(model, prompts: list, steps: int, seed: int, batch: int, default_bits=None) -> tuple:
    """Clips (B, F, H, W, 3) and, per generate call, the per-step (coverage, relative cost)."""
    cov = BlockCoverage(model.transformer, default_bits)
    clips, calls = [], []
    for i in range(0, len(prompts), batch):
        cov.per_call.clear()
        clips.append(generate(model, prompts[i:i + batch], seed=seed + i, steps=steps, progress=False).videos)
        calls.append(list(cov.per_call))
    return torch.cat(clips), calls


def rows_for(args) -> list:
    """(name, family, quant DVDQuantConfig or None, cache factory or None)."""
    rows = [("FP", "fp", None, None)]
    rows += [(f"FP + MagCache {t}", "fp+magcache", None, ("mag", t)) for t in args.mag]
    rows += [(f"FP + FirstBlockCache {t}", "fp+fbc", None, ("fbc", t)) for t in args.fbc]
    w4a4 = dict(w_bits=4, a_bits=4)
    rows.append(("W4A4", "w4a4", dvdquant.DVDQuantConfig(**w4a4), None))
    rows += [(f"W4A4 δ-GBS {d}", "gbs", dvdquant.DVDQuantConfig(**w4a4, gbs=dvdquant.GBSConfig(delta=d)), None)
             for d in args.deltas]
    rows += [(f"W4A4 + MagCache {t}", "w4a4+magcache", dvdquant.DVDQuantConfig(**w4a4), ("mag", t)) for t in args.mag]
    rows += [(f"W4A4 + FirstBlockCache {t}", "w4a4+fbc", dvdquant.DVDQuantConfig(**w4a4), ("fbc", t)) for t in args.fbc]
    rows += [(f"dvdquant policy, budget {b}", "policy",
              dvdquant.DVDQuantConfig(**w4a4, policy=dvdquant.StepPolicyConfig(budget=b)), None) for b in args.budgets]
    rows += [(f"dvdquant schedule {s}", "schedule",
              dvdquant.DVDQuantConfig(**w4a4, policy=dvdquant.StepPolicyConfig(schedule=s)), None) for s in args.schedules]
    return [r for r in rows if r[1] == "fp" or args.only is None or r[1] in args.only]


_QUANTIZED: dict = {}


def quantized_copy(base, qcfg):
    """A copy of ``base`` with its transformer quantized by ``qcfg``: the weights are quantized once per
    configuration without its step policy (``gbs``), and the copy gets the row's own step runtime."""
    weights_cfg = dataclasses.replace(qcfg, gbs=None, policy=None)
    key = repr(weights_cfg)
    if key not in _QUANTIZED:
        t = copy.deepcopy(base.transformer)
        dvdquant.quantize_(t, weights_cfg, progress=False)
        _QUANTIZED[key] = t
    model = copy.copy(base)
    model.transformer = copy.deepcopy(_QUANTIZED[key])
    api.attach_runtime(model.transformer, get_state(model.transformer), dataclasses.replace(qcfg, policy=None))
    if qcfg.policy is not None:
        api.set_step_policy(model.transformer, qcfg.policy)
    return model


def evaluate(base, rows: list, prompts: list, factors: list, steps: int, args, law: list) -> list:
    out, ref = [], None
    for name, family, qcfg, cache in rows:
        t0 = time.perf_counter()
        if qcfg is not None:
            model = quantized_copy(base, qcfg)
        else:
            model = copy.copy(base)
            model.transformer = copy.deepcopy(base.transformer)
        if cache is not None:
            kind, thr = cache
            model.transformer.enable_cache(_mag_config(thr, steps, law) if kind == "mag" else _fbc_config(thr))
        clips, calls = run_row(model, prompts, steps, args.seed, args.batch, qcfg.a_bits if qcfg else None)
        coverage = [sum(c[t][0] for c in calls) / len(calls) for t in range(steps)]
        compute = sum(sum(cost for _, cost in c) / steps for c in calls) / len(calls)
        if ref is None:
            ref = clips
        p = psnr(ref, clips)
        hits = adherence_per_clip(clips, factors)["all"].float()
        iv = mean_interval(p[p < 100].tolist()) if bool((p < 100).any()) else None
        row = {"name": name, "family": family, "steps": steps, "relative_compute": round(compute, 4),
               "block_work_share": round(sum(coverage) / steps, 3),
               "coverage": [round(c, 3) for c in coverage],
               "psnr_db_mean": round(iv.mean, 3) if iv else None,
               "psnr_db_ci95": [round(iv.lo, 3), round(iv.hi, 3)] if iv else None,
               "psnr_db_per_clip": [round(float(v), 3) for v in p],
               "adherence_all": round(float(hits.mean()), 4), "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{steps:3d} steps  {name:28s} compute {row['relative_compute']:.3f}  PSNR {row['psnr_db_mean']}  "
              f"adherence {row['adherence_all']:.3f}  ({row['seconds']} s)", flush=True)
        out.append(row)
    return out


def plot(rows: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    step_counts = sorted({r["steps"] for r in rows})
    fig, axes = plt.subplots(1, len(step_counts), figsize=(6 * len(step_counts), 4.5), squeeze=False)
    for ax, steps in zip(axes[0], step_counts):
        fams: dict = {}
        for r in rows:
            if r["steps"] == steps and r["psnr_db_mean"] is not None:
                fams.setdefault(r["family"], []).append(r)
        for fam, rs in sorted(fams.items()):
            rs = sorted(rs, key=lambda r: r["relative_compute"])
            ax.plot([r["relative_compute"] for r in rs], [r["psnr_db_mean"] for r in rs], "o-", label=fam)
        ax.set_title(f"embedded model, {steps} steps")
        ax.set_xlabel("relative compute (bf16 step = 1)")
        ax.set_ylabel("PSNR vs FP (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _floats(s: str) -> list:
    return [float(v) for v in s.split(",") if v.strip()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--calibration", type=int, default=4, help="prompts (another seed) for MagCache's law")
    ap.add_argument("--steps", default="20,50")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8, help="prompts per generate call (default: %(default)s)")
    ap.add_argument("--deltas", type=_floats, default=[0.06, 0.12, 0.24])
    ap.add_argument("--mag", type=_floats, default=[0.06, 0.12], help="MagCache thresholds")
    ap.add_argument("--fbc", type=_floats, default=[0.05, 0.1], help="FirstBlockCache thresholds")
    ap.add_argument("--budgets", type=_floats, default=[0.5, 0.7],
                    help="dvdquant step policy budgets (mean step cost relative to an A8 step, planned with the "
                         "policy's cost table of the device it runs on)")
    ap.add_argument("--schedules", type=lambda v: [s for s in v.split(",") if s], default=[],
                    help="fixed step schedules to replay (S/4/8 per step, comma-separated; family 'schedule'), e.g. "
                         "the ones a GPU benchmark replays")
    ap.add_argument("--only", type=lambda v: v.split(","), default=None,
                    help="families to run besides the FP reference (fp+magcache, fp+fbc, w4a4, gbs, w4a4+magcache, "
                         "w4a4+fbc, policy, schedule; default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    base = load_embedded(device=args.device)
    combos = sample_combinations(args.prompts, seed=args.seed)
    prompts = [make_caption(f) for f in combos]
    cal = [make_caption(f) for f in sample_combinations(args.calibration, seed=args.seed + 1000)]
    rows = []
    res = {"device": args.device if args.device != "cpu" else f"CPU ({platform.machine()}, "
           f"{torch.get_num_threads()} threads)", "prompts": prompts, "costs": {str(k): v for k, v in COSTS.items()},
           "batch": args.batch, "rows": rows}
    for steps in [int(s) for s in args.steps.split(",")]:
        law = magnitude_law(base, cal, steps, args.seed + 1000)
        rows += evaluate(base, rows_for(args), prompts, combos, steps, args, law)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
