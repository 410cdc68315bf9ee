"""dvdquant's step policy: per step and per sample, skip the tail blocks, run at low bits or at high bits.

The indicator (block hooks in :mod:`dvdquant.nn.policy_hooks`): every step runs block 0 (at
``high_bits``) and measures the relative L1 change of its residual r0 = block0(x) − x against the
previous step, d_t = Σ|r0_t − r0_{t−1}| / Σ|r0_{t−1}| (one sample's rows: its tokens × channels).
The policy adds d_t to an accumulator A kept since the sample's last step that ran in full, then:
A < τ (``skip_threshold``) → *skip*: the tail blocks are not run, their cached residual (tail output −
block-0 output of the last step that ran) is added instead; else A < δ (``bits_threshold``) → run the
tail at ``low_bits``; else at ``high_bits``; a step that runs resets A to 0. The first
``warmup_steps`` run at high bits, the last ``final_steps`` (when the pipeline tells the number of
steps) and any step after ``max_skips`` skips in a row, or without a cached residual, run.
Measured on the embedded model (docs/RESULTS.md, "Which signal predicts a step's change"), block 0's
residual change ranks steps by their real change best (Spearman 0.92 FP / 0.90 W4A4).

Budget (``StepPolicyConfig.budget`` = b, mean step cost relative to a high-bit step): a step's cost
comes from :data:`COSTS` (per device) and the share of block 0 in the blocks. Per sample, the
controller plans the run's cost (forced steps at the high-bit cost, the free steps sharing what is
left of b·N; b per step when N is unknown), keeps the debt D = spent − planned, and scales both
thresholds by exp(``GAIN`` · D / (1 − cost of a skip)): over budget, more steps skip or run low (δ is
scaled only where low bits cost less than high bits). No data and no second pass: the thresholds move
during the run, from the decisions' own costs. With ``StepPolicyConfig.schedule`` the actions are read
from the schedule instead (block 0 still runs and measures; a skip without a cached residual runs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..config import StepPolicyConfig

SKIP = 0          # the action of a skipped step (as the tracker's schedule entry)
GAIN = 4.0        # threshold scale per unit of debt (debt in units of the cost between a skip and a high-bit step)
SCALE_LIMITS = (1e-4, 1e4)


@dataclass(frozen=True)
class StepCosts:
    """The cost model of one device, relative to a step run in full at high bits.

    ``overhead``: share of that step spent outside the transformer blocks (embeddings, output head);
    ``low_ratio``: a block's time at low bits over its time at high bits; ``high_vs_bf16``: a high-bit
    step's time over a bf16 step's (None where not measured); ``source``: where they come from."""

    overhead: float
    low_ratio: float
    source: str
    high_vs_bf16: Optional[float] = None

    def cost(self, action: int, high_bits: int, probe_share: float) -> float:
        """Cost of a step whose tail blocks take ``action`` (SKIP, low or high bits); block 0 (its share of the
        blocks ``probe_share``) runs at high bits in every step."""
        if action == high_bits:
            return 1.0
        blocks = 1.0 - self.overhead
        tail = 0.0 if action == SKIP else (1.0 - probe_share) * self.low_ratio
        return self.overhead + blocks * (probe_share + tail)


# Per device type. "cpu": the embedded model (6 blocks, W4A4 DVD-Quant, 8-bit attention) on a 2-core CPU, the
# simulated reference path (fake quantization in fp32: A4 costs more than A8 there), process CPU time, measured
# by benchmarks/step_costs.py (docs/results/step_costs_embedded_cpu.json: overhead −0.02 → 0, low_ratio 1.40;
# the skip cost this predicts, 0.150, against 0.142 measured). "cuda": H100, Wan 2.1 14B eager steps with 8-bit
# attention, W4A4 2835 ms, W4A8 (e4m3) 3024 ms, bf16 3365 ms (docs/results/step_wan14b_eager_h100.json); the
# share outside the blocks was not measured there and is taken as 0. benchmarks/quality_vs_cost.py counts
# compute with the same "cuda" row.
COSTS = {
    "cpu": StepCosts(overhead=0.0, low_ratio=1.40, source="benchmarks/step_costs.py, embedded model, 2-core CPU"),
    "cuda": StepCosts(overhead=0.0, low_ratio=2835 / 3024, high_vs_bf16=3024 / 3365,
                      source="docs/results/step_wan14b_eager_h100.json: Wan 2.1 14B eager step, H100"),
}


def scheduled_action(config: StepPolicyConfig, step: int) -> int:
    """The action ``config.schedule`` gives ``step`` (past its end: high bits)."""
    ch = config.schedule[step] if step < len(config.schedule) else str(config.high_bits)
    return SKIP if ch == "S" else int(ch)


class _Sample:
    """One sample's accumulator, skip run and budget account."""

    def __init__(self) -> None:
        self.acc = 0.0
        self.skips = 0
        self.spent = 0.0
        self.planned = 0.0
        self.has_run = False


class StepPolicy:
    """Per sample: skip / low / high bits from the accumulated block-0 residual change (see the module doc).

    For :class:`~dvdquant.nn.step_hooks.StepTracker` it is a step policy that leaves the bits to the block
    hooks (``choose`` returns None); the hooks call :meth:`decide` once per sample and step. Records:
    ``decisions`` (per step, per sample: SKIP or the tail's bits), ``step_costs`` (per step, per sample),
    ``indicators`` (per step, the largest accumulated indicator a decision saw; nan before any)."""

    observes_output = False

    def __init__(self, config: StepPolicyConfig, costs: Optional[StepCosts] = None, probe_share: float = 0.0):
        self.config = config
        self.costs = costs                 # None: COSTS of the device the hooks report
        self.device_costs = COSTS["cpu"]
        self.probe_share = probe_share     # block 0's share of the blocks (set by the hooks: 1 / blocks)
        self.reset()

    def set_device(self, device_type: str) -> None:
        """Where the model runs (the hooks report it): picks the :data:`COSTS` row (unknown types: "cuda")."""
        self.device_costs = COSTS.get(device_type, COSTS["cuda"])

    # ----------------------------------------------------------------- StepTracker's protocol
    def reset(self) -> None:
        self.samples: dict = {}
        self.decisions: list = []
        self.step_costs: list = []
        self.scales: list = []
        self.indicators: list = []
        self._step: Optional[int] = None

    def choose(self, step_index: int, total_steps: Optional[int]) -> Optional[int]:
        return None

    def observe(self, step_index: int, bits: Optional[int], change: Optional[float], coverage: float = 1.0) -> None:
        pass

    # ----------------------------------------------------------------- the decision
    def cost(self, action: int) -> float:
        return (self.costs or self.device_costs).cost(action, self.config.high_bits, self.probe_share)

    def scale(self, sample: int) -> float:
        """The factor on both thresholds for ``sample`` now (1 without a budget)."""
        s = self.samples.get(sample)
        if self.config.budget is None or s is None:
            return 1.0
        span = max(1.0 - self.cost(SKIP), 1e-6)
        lo, hi = SCALE_LIMITS
        return min(max(math.exp(GAIN * (s.spent - s.planned) / span), lo), hi)

    def decide(self, sample: int, step: int, total: Optional[int], change: Optional[float], can_skip: bool) -> int:
        """The action of ``sample`` at ``step`` (SKIP, low_bits or high_bits); ``change``: its block-0 residual
        change since the previous step (None at its first step); ``can_skip``: a cached residual exists."""
        c = self.config
        s = self.samples.setdefault(sample, _Sample())
        if change is not None:
            s.acc += change
        k = self.scale(sample)
        late = total is not None and step >= total - c.final_steps
        if c.schedule is not None:
            action = scheduled_action(c, step)
        elif step < c.warmup_steps or not s.has_run:
            action = c.high_bits
        elif can_skip and not late and s.skips < c.max_skips and s.acc < c.skip_threshold * k:
            action = SKIP
        else:                                # δ moves with the budget only where low bits are cheaper
            kd = k if self.cost(c.low_bits) < 1.0 else 1.0
            action = c.low_bits if s.acc < c.bits_threshold * kd else c.high_bits
        self._record(sample, step, action, s.acc if change is not None else math.nan, k)
        s.spent += self.cost(action)
        s.planned += self._planned(step, total)
        if action == SKIP:
            s.skips += 1
        else:
            s.acc, s.skips, s.has_run = 0.0, 0, True
        return action

    def _planned(self, step: int, total: Optional[int]) -> float:
        """The cost the budget plans for ``step``: forced steps at their high-bit cost, free steps at an equal
        share of the rest (b per step when the number of steps is unknown)."""
        c = self.config
        if c.budget is None:
            return 0.0
        if total is None:
            return c.budget
        forced = min(c.warmup_steps, total) + min(c.final_steps, max(total - c.warmup_steps, 0))
        if step < c.warmup_steps or step >= total - c.final_steps:
            return 1.0
        free = max(total - forced, 1)
        return min(max((c.budget * total - forced) / free, self.cost(SKIP)), 1.0)

    def _record(self, sample: int, step: int, action: int, indicator: float, scale: float) -> None:
        if self._step != step:
            self._step = step
            for rec in (self.decisions, self.step_costs, self.scales):
                rec.append({})
            self.indicators.append(math.nan)
        self.decisions[-1][sample] = action
        self.step_costs[-1][sample] = self.cost(action)
        self.scales[-1][sample] = scale
        if not math.isnan(indicator):
            prev = self.indicators[-1]
            self.indicators[-1] = indicator if math.isnan(prev) else max(prev, indicator)

    # ----------------------------------------------------------------- reports
    def mean_cost(self, sample: Optional[int] = None) -> float:
        """Mean step cost of the run so far (relative to a high-bit step): of ``sample``, or over all samples."""
        vals = [v for step in self.step_costs for k, v in step.items() if sample is None or k == sample]
        return sum(vals) / len(vals) if vals else math.nan
