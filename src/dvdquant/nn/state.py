"""Run-time state shared by every quantized layer of one model.

δ-GBS changes the activation bit-width of *all* layers between denoising steps, and
timestep-aware baselines need the current step index. Both live in one small object that
``quantize_`` attaches to the model and hands to each :class:`QuantLinear` — no globals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RuntimeState:
    """Mutable per-model state read by quantized layers at forward time."""

    a_bits: Optional[int] = None      # overrides every layer's configured activation bits when set
    step_index: Optional[int] = None  # current denoising step (None outside a sampling loop)
    history: list = field(default_factory=list)  # (step_index, a_bits) actually used, for reports

    def reset(self) -> None:
        self.a_bits = None
        self.step_index = None
        self.history.clear()


STATE_ATTR = "_dvdquant_state"


def get_state(model) -> Optional[RuntimeState]:
    """The :class:`RuntimeState` that ``quantize_`` attached to ``model`` (None if not quantized)."""
    return getattr(model, STATE_ATTR, None)
