"""δ-GBS — δ-Guided Bit Switching of activation bits across denoising steps.

A step policy for :class:`~dvdquant.nn.step_hooks.StepTracker`, which calls it from the diffusers
hook on the transformer. After each step t the tracker measures the output change
L1_t = Σ|F_t − F_{t−1}| / Σ|F_{t−1}| (everything the transformer returned in the step: both CFG
branches, every batch element); the policy accumulates it since the last high-bit step. While
the sum stays under δ the next step runs at ``low_bits``; once it reaches δ the next step runs
at ``high_bits`` and the sum resets. The first ``warmup_steps`` (and the last
``final_high_steps``, when the pipeline tells the number of steps) run high. δ → 0 is W4A8,
δ → ∞ is W4A4.

Steps served from a cache (the tracker's coverage, :mod:`dvdquant.nn.step_hooks`): a skipped step
(coverage 0) adds nothing and leaves the accumulator and a pending high-bit step as they were, so
the choice carries over to the next step that runs, whose change is measured against the last
step that ran; a partly skipped step adds its change, and at ``high_bits`` it resets the share of
the sum it covered (acc ← acc·(1 − coverage); a full step resets it all). The ``indicators`` are
``nan`` for skipped steps.

Across a bit switch the measured change also holds the switch's own quantization noise, so with
``GBSConfig.indicator="same_bits"`` (default) a switch counts min(measured change, last change
measured between equal-bit steps); ``"raw"`` keeps the paper's indicator. Both look only at the
model's own outputs (no data).
"""

from __future__ import annotations

from typing import Optional

from ..config import GBSConfig


class FixedBits:
    """The step policy of a model without δ-GBS: every layer keeps its configured bits."""

    observes_output = False

    def reset(self) -> None:
        pass

    def choose(self, step_index: int, total_steps: Optional[int]) -> Optional[int]:
        return None

    def observe(self, step_index: int, bits: Optional[int], change: Optional[float],
                coverage: float = 1.0) -> None:
        pass


class GBSController:
    """Chooses each step's activation bits from the accumulated relative L1 change of the output."""

    observes_output = True

    def __init__(self, config: GBSConfig):
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.acc = 0.0
        self.force_high = False
        self.indicators: list[float] = []  # L1_t counted per step (nan for the first)
        self.prev_bits: Optional[int] = None
        self.last_same_bits: Optional[float] = None

    def choose(self, step_index: int, total_steps: Optional[int]) -> int:
        c = self.config
        late = total_steps is not None and step_index >= total_steps - c.final_high_steps
        return c.high_bits if step_index < c.warmup_steps or late or self.force_high else c.low_bits

    def observe(self, step_index: int, bits: Optional[int], change: Optional[float],
                coverage: float = 1.0) -> None:
        if coverage <= 0:                                     # served from a cache: the choice carries over
            self.indicators.append(float("nan"))
            return
        if bits == self.config.high_bits:
            self.acc *= 1.0 - min(coverage, 1.0)              # what ran at high bits is reset
        self.force_high = False
        if change is None:
            self.indicators.append(float("nan"))
        else:
            if bits == self.prev_bits:
                self.last_same_bits = change
            elif self.config.indicator == "same_bits" and self.last_same_bits is not None:
                change = min(change, self.last_same_bits)          # strip the switch's own noise
            self.indicators.append(change)
            self.acc += change
        self.prev_bits = bits
        if self.acc >= self.config.delta:
            self.force_high = True
