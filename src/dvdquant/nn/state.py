"""Run-time state shared by every quantized layer of one model.

δ-GBS changes the activation bit-width of *all* layers between denoising steps, and
timestep-aware baselines need the current step index. Both live in one small object that
``quantize_`` attaches to the model and hands to each :class:`QuantLinear` — no globals. So does
the model's execution config (backend, GEMM route, …; ``dvdquant.set_backend``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..kernels.execution import ExecutionConfig


@dataclass
class RuntimeState:
    """Mutable per-model state read by quantized layers at forward time.

    ``bits_tensor`` mirrors ``a_bits`` in a 1-element CPU int32 tensor (−1 for None). The FP8
    kernels read the bit-width from it *inside* their custom op, so a ``torch.compile``d model
    switches A4 ↔ A8 between steps (δ-GBS) without a guard on a Python int, i.e. without
    recompiling; reading a CPU tensor costs no device synchronisation.
    """

    a_bits: Optional[int] = None      # overrides every layer's configured activation bits when set
    step_index: Optional[int] = None  # current denoising step (None outside a sampling loop)
    history: list = field(default_factory=list)  # (step_index, a_bits) actually used, for reports
    bits_tensor: torch.Tensor = field(default_factory=lambda: torch.full((1,), -1, dtype=torch.int32),
                                      repr=False, compare=False)
    # context parallelism (dvdquant.distributed.enable_context_parallel): the ranks that share one
    # sequence; per-sample statistics taken over tokens (ARQ's per-channel Λ_t) are reduced over it
    process_group: Optional[object] = field(default=None, repr=False, compare=False)
    # how every layer of the model runs (frozen; replaced whole by dvdquant.set_backend, kept by reset())
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def __setattr__(self, name, value) -> None:
        object.__setattr__(self, name, value)
        if name == "a_bits" and "bits_tensor" in self.__dict__:
            self.bits_tensor.fill_(-1 if value is None else int(value))

    def __post_init__(self) -> None:
        self.bits_tensor.fill_(-1 if self.a_bits is None else int(self.a_bits))

    def reset(self) -> None:
        self.a_bits = None
        self.step_index = None
        self.history.clear()

    def all_tokens_max(self, t: torch.Tensor) -> torch.Tensor:
        """``t``, maxima over this rank's tokens, as the maxima over every rank's tokens of the sequence.

        Under sequence (context) parallelism each rank holds a slice of every sample's tokens, so a
        per-channel absmax taken locally differs from the single-device one; an elementwise all-reduce
        (MAX) over ``process_group`` restores it. ``t`` is per sample, (B, K) for B samples (every rank
        holds the same samples), so each sample's statistic stays its own. Without a group this
        returns ``t`` unchanged.
        """
        if self.process_group is None:
            return t
        from torch.distributed import _functional_collectives as funcol  # traceable by torch.compile
        return funcol.all_reduce(t.contiguous(), "max", self.process_group)


STATE_ATTR = "_dvdquant_state"


def get_state(model) -> Optional[RuntimeState]:
    """The :class:`RuntimeState` that ``quantize_`` attached to ``model`` (None if not quantized)."""
    return getattr(model, STATE_ATTR, None)
