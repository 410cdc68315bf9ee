"""The per-step runtime of a quantized transformer, as a diffusers ``ModelHook`` on it.

``quantize_`` and ``load`` register a :class:`StepHook` (name ``"dvdquant_steps"``) on the
transformer's diffusers ``HookRegistry``, so every stock pipeline (and dvdquant's own sampler)
drives it just by calling the transformer. Per call the hook:

* finds the denoising step: the ``step_index`` of diffusers' ``cache_context`` when the pipeline
  gives one, else the ``timestep`` argument (its max; a new value is a new step) and, at an equal
  timestep, the input latent (its first sample's sum and absolute sum: a new latent is a new step, so
  nearby steps whose timesteps round to one bf16 value stay apart, while the CFG calls of a step, which
  read the same latent, stay one step);
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

Steps served from a cache (diffusers' MagCache, FirstBlockCache, TaylorSeer, FasterCache, PAB):
the step's *coverage* is the work (MACs) of the quantized layers inside the transformer blocks
that really ran in the step (:mod:`.step_work` counts it), over the step's number of transformer
calls times the work of the fullest call of the pipeline call (the first call runs whole under
every diffusers cache; both CFG branches do the same work). A step with coverage 0 is *skipped*: its schedule entry is 0, it has no output
change, the next change is measured against the last step that ran, and the policy's bit choice
carries over to the next step that runs. A step with 0 < coverage < 1 is *partly skipped*: it
ran at its bits, its output change is measured, and it weighs its coverage in ``mean_bits`` and
in δ-GBS's reset (:mod:`dvdquant.algorithms.gbs`). Outputs are compared only with the last
output of the same shape in the same slot (FasterCache's cond-only calls).

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

from ..errors import DVDQuantError
from ..kernels.finite import raise_if_nonfinite
from .quant_linear import QuantLinear
from .step_work import WorkCounter, install_probes, remove_probes

log = logging.getLogger(__name__)
HOOK_NAME = "dvdquant_steps"
MAX_CALLS_PER_STEP = 4        # calls of one step whose outputs count in the output change (CFG: 2)
SKIP = 0                      # the schedule entry of a step served from a cache
# diffusers hooks on the transformer itself that change the calls the step hook must see
_FASTER_CACHE = "faster_cache_denoiser"
_OUTER_HOOKS = (_FASTER_CACHE,)


class StepPolicy(Protocol):
    """Chooses each step's activation bits (``None``: leave the layers' bits as they are).

    ``observes_output``: whether the policy needs the output change (else the tracker keeps no
    copy of the outputs). ``observe`` gets the step's ``coverage`` (0: served from a cache, then
    ``change`` is None and the choice should carry over to the next step)."""

    observes_output: bool

    def reset(self) -> None: ...

    def choose(self, step_index: int, total_steps: Optional[int]) -> Optional[int]: ...

    def observe(self, step_index: int, bits: Optional[int], change: Optional[float],
                coverage: float = 1.0) -> None: ...


def schedule_string(schedule) -> str:
    """One character per step: ``S`` for a skipped step, else its activation bits (``88S4S4``)."""
    return "".join("S" if b == SKIP else str(b) for b in schedule)


def _output_tensor(output: Any) -> Optional[torch.Tensor]:
    if isinstance(output, (tuple, list)):
        output = output[0] if output else None
    output = getattr(output, "sample", output)
    return output if isinstance(output, torch.Tensor) else None


class StepTracker:
    """Step detection, the per-step schedule, coverage and output change; the policy decides the bits.

    ``schedule``: activation bits of each step of the current (or last) pipeline call, the
    configured ``configured_bits`` where the policy leaves them, :data:`SKIP` (0) for a step
    served from a cache; ``coverage``: the share of a full step's block work that ran (1.0 without
    a cache; the current step's is read live); ``changes``: the output change measured after each
    step (``nan`` for the first and for skipped steps; the last step's is known once the next call
    starts or after :meth:`finish`). ``total_steps`` comes from the pipeline's cache context when
    it gives one; set it by hand for loops that do not.
    """

    def __init__(self, states: list, policy: StepPolicy, configured_bits: int):
        self.states, self.policy, self.configured_bits = list(states), policy, configured_bits
        self.total_steps: Optional[int] = None
        self.counters: list = []        # WorkCounter of each driven model (its step hook adds it)
        self.reset_callbacks: list = []  # called on reset (the step policy's block hooks: their caches)
        self._owns_bits = False         # whether this tracker has written bits into the states
        self.reset()

    # ------------------------------------------------------------------ public
    def reset(self) -> None:
        """Forget the current pipeline call: the next transformer call starts step 0."""
        self.policy.reset()
        self.schedule: list[int] = []
        self.changes: list[float] = []
        self._coverage: list[float] = []
        self._full_call = 0.0           # block work of the fullest transformer call of this pipeline call
        self._call_start: Optional[float] = None
        self.step_index: Optional[int] = None
        self._key = self._direction = None
        self._latent: Optional[tuple] = None   # fingerprint of the current step's input latent (timestep keys)
        self._prev: dict = {}           # slot → output of the last step that ran (fp32)
        self._cur: dict = {}            # slot → output of this step
        self._sums: list = []           # (Σ|F_t − F_prev|, Σ|F_prev|) per paired call of this step
        self._calls, self._slot = 0, "call0"
        self._call_done = False
        for st in self.states:
            if self._owns_bits:
                st.a_bits = None
            st.step_index = None
            st.history.clear()
        self._owns_bits = False
        for f in self.reset_callbacks:
            f()

    def finish(self) -> None:
        """Close the current step (its output change is measured now); the next call starts anew."""
        if self.step_index is not None and len(self.changes) < len(self.schedule):
            self._close_step()
        self._call_done = True

    @property
    def slot(self) -> str:
        """The current call's slot: its cache-context name (``cond``, ``uncond``, ``cond_uncond``), else
        ``call<k>`` for the k-th call of the step."""
        return self._slot

    @property
    def coverage(self) -> list:
        """Per step, the share of a full step's block work that ran (0: skipped; the open step read live)."""
        if len(self._coverage) < len(self.schedule):
            return self._coverage + [self.current_coverage()]
        return list(self._coverage)

    def current_coverage(self) -> float:
        """The open step's coverage so far: its block work over ``calls × the fullest call's`` (1.0 where
        no block work is counted)."""
        work = self._work()
        full = self._full_call * max(self._calls, 1)
        if work is None or full <= 0:
            return 1.0
        return min(work / full, 1.0)

    def schedule_so_far(self) -> list:
        """``schedule`` with the open step read live: SKIP if nothing of it ran so far (for progress bars)."""
        if not self.schedule or len(self._coverage) == len(self.schedule) or self.current_coverage() > 0:
            return list(self.schedule)
        return self.schedule[:-1] + [SKIP]

    def skipped_steps(self) -> list:
        """Indices (in this call) of the steps served from a cache."""
        return [i for i, b in enumerate(self.schedule) if b == SKIP]

    def mean_bits(self) -> float:
        """Average activation bits over the block work that ran: Σ coverage·bits / Σ coverage
        (skipped steps weigh 0; without a cache, the plain mean); nan before any step ran."""
        pairs = [(c, b) for c, b in zip(self.coverage, self.schedule) if b != SKIP and c > 0]
        total = sum(c for c, _ in pairs)
        return sum(c * b for c, b in pairs) / total if total > 0 else float("nan")

    @property
    def indicators(self) -> list:
        """What the policy counted per step (δ-GBS: after its same-bits rule), else the changes."""
        return list(getattr(self.policy, "indicators", self.changes))

    # ------------------------------------------------------------------ driven by the hook
    def before_call(self, step: Optional[int], timestep: Optional[float], total: Optional[int],
                    slot: Optional[str], latent: Optional[tuple] = None) -> None:
        """One transformer call: its step index (None: found from ``timestep`` and ``latent``, the
        fingerprint :func:`latent_fingerprint` of its input), the loop's length and the call's slot."""
        if total is not None:
            self.total_steps = int(total)
        if self._call_done:
            self.reset()
        key = step if step is not None else timestep
        if key is None:
            return
        if self._key is not None and self._starts_new_call(key, step is not None):
            self.reset()
        new_latent = step is None and latent is not None and self._latent is not None and latent != self._latent
        if self._key is None or key != self._key or new_latent:
            self._begin_step(key, step)
            self._latent = latent
        self._slot = slot if slot is not None else f"call{self._calls}"
        self._calls += 1
        self._call_start = self._work()

    def after_call(self, output: Any) -> None:
        raise_if_nonfinite()
        if self._call_start is not None:
            self._full_call = max(self._full_call, self._work() - self._call_start)
            self._call_start = None
        out = _output_tensor(output)
        if out is None or self.step_index is None or not self.policy.observes_output:
            return
        if self._slot not in self._cur and len(self._cur) >= MAX_CALLS_PER_STEP:
            return
        cur = out.detach().to(torch.float32, copy=True)
        prev = self._prev.get(self._slot)
        if prev is not None and prev.shape != cur.shape:
            return                                # another batch (FasterCache's cond-only call): not compared
        if prev is not None:
            self._sums.append(((cur - prev).abs().sum(), prev.abs().sum()))
        self._cur[self._slot] = cur

    # ------------------------------------------------------------------ internals
    def _work(self) -> Optional[float]:
        return sum(c.read() for c in self.counters) if self.counters else None

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
            if step is None and key != self._key:  # timestep keys: the loop's direction
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
        for c in self.counters:
            c.reset()
        self._calls = 0

    def _close_step(self) -> None:
        coverage = self.current_coverage()
        self._coverage.append(coverage)
        bits = self.states[0].a_bits if self.states else None
        if coverage == 0:                         # served from a cache: nothing ran, nothing measured
            self.schedule[-1] = SKIP
            self.changes.append(math.nan)
            self.policy.observe(self.step_index, bits, None, 0.0)
            self._cur, self._sums = {}, []
            return
        change = None
        if self._sums:
            num = sum(s[0] for s in self._sums)
            den = sum(s[1] for s in self._sums)
            change = float(num / den.clamp_min(1e-12))
        self.changes.append(math.nan if change is None else change)
        self.policy.observe(self.step_index, bits, change, coverage)
        self._prev.update(self._cur)
        self._cur, self._sums = {}, []


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class StepHook(ModelHook):
    """The diffusers hook that feeds one transformer's calls to a :class:`StepTracker`; it owns the
    model's :class:`~.step_work.WorkCounter` and the probes that feed it."""

    _is_stateful = True          # so diffusers hands it the cache context and the end-of-call reset

    def __init__(self, tracker: StepTracker):
        super().__init__()
        self.tracker = tracker
        self.context = StateManager(_NoState)
        self.counter = WorkCounter()
        self.probes: list = []

    @torch.compiler.disable
    def pre_forward(self, module, *args, **kwargs):
        ctx = getattr(self.context, "_context", None)
        _check_hooks(module, getattr(ctx, "name", None))
        step = getattr(ctx, "step_index", None)
        total = getattr(ctx, "num_inference_steps", None)
        slot = getattr(ctx, "name", None)
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        timestep = float(t.detach().float().amax()) if isinstance(t, torch.Tensor) and t.numel() else \
            (float(t) if isinstance(t, (int, float)) else None)
        latent = None
        if step is None:
            latent = latent_fingerprint(kwargs.get("hidden_states", args[0] if args else None))
        self.tracker.before_call(step, timestep, total, slot, latent)
        return args, kwargs

    @torch.compiler.disable
    def post_forward(self, module, output):
        self.tracker.after_call(output)
        return output

    def reset_state(self, module):
        self.tracker.finish()
        return module


def latent_fingerprint(x) -> Optional[tuple]:
    """(Σ x, Σ |x|) in fp32 of the first sample of the transformer's input ``x`` (None if not a tensor):
    the CFG calls of a step (and the halves of a batched CFG call) read the same latent."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.numel() == 0:
        return None
    first = x.detach()[0]
    return tuple(torch.stack([first.sum(dtype=torch.float32), first.abs().sum(dtype=torch.float32)]).tolist())


def _check_hooks(module: torch.nn.Module, branch: Optional[str]) -> None:
    """Refuse a diffusers hook on the transformer, registered after the step hook, that changes the calls
    it sees; and FasterCache under a pipeline that runs the CFG branches as separate calls."""
    registry = module._diffusers_hook
    order = registry._hook_order
    above = [n for n in order[order.index(HOOK_NAME) + 1:] if n in _OUTER_HOOKS]
    if above:
        raise DVDQuantError(f"{', '.join(above)} was registered on {type(module).__name__} after dvdquant's step "
                            "hook: call dvdquant.restack_step_hook(transformer) after enable_cache (or enable the "
                            "cache before quantize_/load)")
    if branch in ("cond", "uncond") and _FASTER_CACHE in registry.hooks:
        raise DVDQuantError("FasterCache needs both guidance branches batched in one transformer call (CogVideoX, "
                            f"Mochi); this pipeline calls {type(module).__name__} once per branch")


def install_step_hook(model: torch.nn.Module, tracker: StepTracker) -> StepHook:
    """Register (or replace) the model's dvdquant step hook, driven by ``tracker``, and its work probes."""
    remove_step_hook(model)
    hook = StepHook(tracker)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, HOOK_NAME)
    hook.probes = install_probes(model, QuantLinear, hook.counter)
    tracker.counters.append(hook.counter)
    return hook


def remove_step_hook(model: torch.nn.Module) -> None:
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    if hook is None:
        return
    restack_step_hook(model)                      # removing a hook under another one would unhook that one
    registry.remove_hook(HOOK_NAME, recurse=False)
    remove_probes(hook.probes)
    if hook.counter in hook.tracker.counters:
        hook.tracker.counters.remove(hook.counter)


def restack_step_hook(model: torch.nn.Module) -> None:
    """Make the step hook the outermost hook of ``model``'s diffusers registry again (after a cache
    that registers a hook on the transformer itself, FasterCache, was enabled after quantize_/load).

    The hooks above it are taken off from the top and registered again below it, in their order, so
    each keeps its place relative to the others; call it between pipeline calls."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is None or registry.get_hook(HOOK_NAME) is None:
        raise DVDQuantError(f"{type(model).__name__} has no dvdquant step hook: quantize_ or load it first")
    order = list(registry._hook_order)
    above = order[order.index(HOOK_NAME) + 1:]
    if not above:
        return
    hooks = [(n, registry.get_hook(n)) for n in [HOOK_NAME] + above]
    for name, _ in reversed(hooks):               # the top one first: removing it rewires nothing below
        registry.remove_hook(name, recurse=False)
    for name, hook in hooks[1:] + hooks[:1]:
        registry.register_hook(hook, name)
    log.info("dvdquant step hook moved above %s on %s", ", ".join(above), type(model).__name__)


def step_tracker(model: torch.nn.Module) -> Optional[StepTracker]:
    """The :class:`StepTracker` driving ``model`` (None if it has no dvdquant step hook)."""
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return hook.tracker if hook is not None else None


def refuse_hooked_layers(model: torch.nn.Module, names) -> None:
    """Refuse to replace layers that carry diffusers hooks (a cache enabled on a Linear, e.g. by
    TaylorSeer's identifiers): the replacement would silently drop them."""
    for name in names:
        try:
            registry = getattr(model.get_submodule(name), "_diffusers_hook", None)
        except AttributeError:                    # a name the model lacks: the caller says so
            continue
        if registry is not None and registry.hooks:
            raise DVDQuantError(f"layer {name} carries diffusers hooks ({', '.join(registry.hooks)}): disable the "
                                "cache, quantize_/load, then enable it again")
