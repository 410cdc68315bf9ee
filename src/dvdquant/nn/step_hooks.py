"""The per-step runtime of a quantized transformer, as a diffusers ``ModelHook`` on it.

``quantize_`` and ``load`` register a :class:`StepHook` (name ``"dvdquant_steps"``) on the
transformer's diffusers ``HookRegistry``, so every stock pipeline (and dvdquant's own sampler)
drives it just by calling the transformer. Per call the hook:

* finds the denoising step: the ``step_index`` of diffusers' ``cache_context`` when the pipeline
  gives one, else the ``timestep`` argument (its max; a new value is a new step);
* starts a new pipeline call after the pipeline's end-of-call reset (``maybe_free_model_hooks``
  → ``reset_state``), when the step index goes back, or when the timesteps turn direction;
* at a new step, asks the step policy (δ-GBS, or fixed bits) for the step's activation bits and
  writes them, with the step index, into every :class:`RuntimeState` it drives;
* records how much the output moved: the step's *output change* is
  Σ|F_t − F_{t−1}| / Σ|F_{t−1}| over everything the transformer returned in the step, every call
  (both CFG branches, paired by cache-context name or call order; the first four calls of a step)
  and every batch element; so CFG run as two calls or as one batched call gives the same number
  (measured only for policies that use it: δ-GBS);
* raises :class:`~dvdquant.NonFiniteError` after a call in which an FP8 layer saw NaN/Inf.

One :class:`StepTracker` can drive several transformers (Wan 2.2's two experts): then the step
index, the bits and the output change run across both as one denoising loop.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional, Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ..kernels.finite import raise_if_nonfinite

log = logging.getLogger(__name__)
HOOK_NAME = "dvdquant_steps"
MAX_CALLS_PER_STEP = 4        # calls of one step whose outputs count in the output change (CFG: 2)


class StepPolicy(Protocol):
    """Chooses each step's activation bits (``None``: leave the layers' bits as they are).

    ``observes_output``: whether the policy needs the output change (else the tracker keeps no
    copy of the outputs)."""

    observes_output: bool

    def reset(self) -> None: ...

    def choose(self, step_index: int, total_steps: Optional[int]) -> Optional[int]: ...

    def observe(self, step_index: int, bits: Optional[int], change: Optional[float]) -> None: ...


def _output_tensor(output: Any) -> Optional[torch.Tensor]:
    if isinstance(output, (tuple, list)):
        output = output[0] if output else None
    output = getattr(output, "sample", output)
    return output if isinstance(output, torch.Tensor) else None


class StepTracker:
    """Step detection, the per-step schedule and the output change; the policy decides the bits.

    ``schedule``: activation bits of each step of the current (or last) pipeline call, the
    configured ``configured_bits`` where the policy leaves them; ``changes``: the output change
    measured after each step (``nan`` for the first; the last step's is known once the next call
    starts or after :meth:`finish`). ``total_steps`` comes from the pipeline's cache context when
    it gives one; set it by hand for loops that do not.
    """

    def __init__(self, states: list, policy: StepPolicy, configured_bits: int):
        self.states, self.policy, self.configured_bits = list(states), policy, configured_bits
        self.total_steps: Optional[int] = None
        self._owns_bits = False         # whether this tracker has written bits into the states
        self.reset()

    # ------------------------------------------------------------------ public
    def reset(self) -> None:
        """Forget the current pipeline call: the next transformer call starts step 0."""
        self.policy.reset()
        self.schedule: list[int] = []
        self.changes: list[float] = []
        self.step_index: Optional[int] = None
        self._key = self._direction = None
        self._prev: dict = {}           # slot → output of the previous step (fp32)
        self._cur: dict = {}            # slot → output of this step
        self._sums: list = []           # (Σ|F_t − F_{t−1}|, Σ|F_{t−1}|) per paired call of this step
        self._calls, self._slot = 0, "call0"
        self._call_done = False
        for st in self.states:
            if self._owns_bits:
                st.a_bits = None
            st.step_index = None
            st.history.clear()
        self._owns_bits = False

    def finish(self) -> None:
        """Close the current step (its output change is measured now); the next call starts anew."""
        if self.step_index is not None and len(self.changes) < len(self.schedule):
            self._close_step()
        self._call_done = True

    def mean_bits(self) -> float:
        """Average activation bits over the schedule (nan before any step)."""
        return sum(self.schedule) / len(self.schedule) if self.schedule else float("nan")

    @property
    def indicators(self) -> list:
        """What the policy counted per step (δ-GBS: after its same-bits rule), else the changes."""
        return list(getattr(self.policy, "indicators", self.changes))

    # ------------------------------------------------------------------ driven by the hook
    def before_call(self, step: Optional[int], timestep: Optional[float], total: Optional[int],
                    slot: Optional[str]) -> None:
        if total is not None:
            self.total_steps = int(total)
        if self._call_done:
            self.reset()
        key = step if step is not None else timestep
        if key is None:
            return
        if self._key is not None and self._starts_new_call(key, step is not None):
            self.reset()
        if self._key is None or key != self._key:
            self._begin_step(key, step)
        self._slot = slot if slot is not None else f"call{self._calls}"
        self._calls += 1

    def after_call(self, output: Any) -> None:
        raise_if_nonfinite()
        out = _output_tensor(output)
        if out is None or self.step_index is None or not self.policy.observes_output:
            return
        if self._slot not in self._cur and len(self._cur) >= MAX_CALLS_PER_STEP:
            return
        cur = out.detach().to(torch.float32, copy=True)
        prev = self._prev.get(self._slot)
        if prev is not None and prev.shape == cur.shape:
            self._sums.append(((cur - prev).abs().sum(), prev.abs().sum()))
        self._cur[self._slot] = cur

    # ------------------------------------------------------------------ internals
    def _starts_new_call(self, key, is_index: bool) -> bool:
        if key == self._key:
            return False
        direction = 1 if key > self._key else -1
        if is_index:
            return direction < 0
        if self._direction is None:
            return False
        return direction != self._direction

    def _begin_step(self, key, step: Optional[int]) -> None:
        if self._key is not None:
            if step is None:                      # timestep keys: the loop's direction
                self._direction = 1 if key > self._key else -1
            self._close_step()
        self._key = key
        i = step if step is not None else (0 if self.step_index is None else self.step_index + 1)
        bits = self.policy.choose(i, self.total_steps)
        for st in self.states:
            if bits is not None:
                st.a_bits = bits
            st.step_index = i
            st.history.append((i, st.a_bits))
        self._owns_bits = self._owns_bits or bits is not None
        self.step_index = i
        current = self.states[0].a_bits if self.states else None
        self.schedule.append(self.configured_bits if current is None else current)
        self._calls = 0

    def _close_step(self) -> None:
        change = None
        if self._sums:
            num = sum(s[0] for s in self._sums)
            den = sum(s[1] for s in self._sums)
            change = float(num / den.clamp_min(1e-12))
        self.changes.append(math.nan if change is None else change)
        bits = self.states[0].a_bits if self.states else None
        self.policy.observe(self.step_index, bits, change)
        self._prev, self._cur, self._sums = self._cur, {}, []


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class StepHook(ModelHook):
    """The diffusers hook that feeds one transformer's calls to a :class:`StepTracker`."""

    _is_stateful = True          # so diffusers hands it the cache context and the end-of-call reset

    def __init__(self, tracker: StepTracker):
        super().__init__()
        self.tracker = tracker
        self.context = StateManager(_NoState)

    @torch.compiler.disable
    def pre_forward(self, module, *args, **kwargs):
        ctx = getattr(self.context, "_context", None)
        step = getattr(ctx, "step_index", None)
        total = getattr(ctx, "num_inference_steps", None)
        slot = getattr(ctx, "name", None)
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        timestep = float(t.detach().float().amax()) if isinstance(t, torch.Tensor) and t.numel() else \
            (float(t) if isinstance(t, (int, float)) else None)
        self.tracker.before_call(step, timestep, total, slot)
        return args, kwargs

    @torch.compiler.disable
    def post_forward(self, module, output):
        self.tracker.after_call(output)
        return output

    def reset_state(self, module):
        self.tracker.finish()
        return module


def install_step_hook(model: torch.nn.Module, tracker: StepTracker) -> StepHook:
    """Register (or replace) the model's dvdquant step hook, driven by ``tracker``."""
    remove_step_hook(model)
    hook = StepHook(tracker)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, HOOK_NAME)
    return hook


def remove_step_hook(model: torch.nn.Module) -> None:
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)


def step_tracker(model: torch.nn.Module) -> Optional[StepTracker]:
    """The :class:`StepTracker` driving ``model`` (None if it has no dvdquant step hook)."""
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return hook.tracker if hook is not None else None
