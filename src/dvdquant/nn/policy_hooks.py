"""The step policy's hooks on the transformer blocks: block 0 measures, the tail blocks run or are skipped.

For a tracker whose policy decides inside the step (:class:`~dvdquant.algorithms.step_policy.StepPolicy`),
diffusers ``ModelHook`` s on the blocks (the ``ModuleList`` s of :data:`.step_work.BLOCK_LISTS`, in order)
do, per transformer call:

* block 0 runs at the policy's high bits; its residual r0 = out − in (hidden stream) gives each row's
  change against the same row of the same slot (cache-context name, else call order) one step
  earlier; the policy decides per *sample* (``decide``), once per step: at the step's first call, from
  the sample's rows there (a ``"cond_uncond"`` call of 2B rows holds B samples, rows i and B + i; the
  first half decides). Later calls of the step (the other CFG branch) follow the decision by row, so
  CFG as two calls and CFG batched decide the same; no row's decision reads another sample's rows.
* the tail blocks run at the decided bits; rows that skip pass through them unchanged and, after the
  last block, get the tail residual (last block out − block 0 out) cached for that slot and row when it
  last ran. Rows with different actions in one call run as sub-batches (tensor arguments whose first
  dimension is the call's batch are sliced), so a sample's output does not depend on the others.
* the tracker's schedule entry of the step is SKIP (0) when every row skipped, else the highest bits
  that ran; the work counters see what ran (coverage).

Block 0's tail-free work is counted in a skipped step's coverage (not 0), so a skipped step is a partly
skipped one for the coverage and :data:`~.step_hooks.SKIP` in the schedule; ``mean_bits`` counts the
tail blocks' bits. Not combined with diffusers' block caches (refused).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook

from ..errors import DVDQuantError
from .step_hooks import SKIP
from .step_work import BLOCK_LISTS

log = logging.getLogger(__name__)
HEAD_HOOK, TAIL_HOOK = "dvdquant_policy_head", "dvdquant_policy_tail"


def transformer_blocks(model: nn.Module) -> list:
    """The model's transformer blocks, in order of their ``ModuleList`` s."""
    return [b for n, m in model.named_children() if n in BLOCK_LISTS and isinstance(m, nn.ModuleList) for b in m]


def _take(v: Any, idx: torch.Tensor, rows: int) -> Any:
    """``v`` restricted to the batch rows ``idx`` (tensors whose first dimension is the batch; tuples inside)."""
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows:
        return v.index_select(0, idx)
    if isinstance(v, (tuple, list)):
        return type(v)(_take(u, idx, rows) for u in v)
    return v


class _Plan:
    """One transformer call: each row's action, block 0's outputs, the slot."""

    def __init__(self, slot, actions: list, out0_h: torch.Tensor, out0_e: Optional[torch.Tensor]):
        self.slot, self.actions, self.rows = slot, actions, len(actions)
        self.out0_h, self.out0_e = out0_h, out0_e
        self.uniform = actions[0] if len(set(actions)) == 1 else None
        dev = out0_h.device
        self.groups = {a: torch.tensor([i for i, b in enumerate(actions) if b == a], device=dev)
                       for a in sorted(set(actions))}


class PolicyRun:
    """The per-model state of the block hooks: per slot, block 0's last residual and the cached tail residual."""

    def __init__(self, tracker, num_blocks: int):
        self.tracker = tracker
        self.policy = tracker.policy
        self.policy.probe_share = 1.0 / num_blocks
        self.high = self.policy.config.high_bits
        self.reset()

    def reset(self) -> None:
        for st in self.tracker.states:           # the configured bits again between pipeline calls
            st.a_bits = None
        self.release()

    def release(self) -> None:
        """Drop the cached residuals (a reference to this run held anywhere then holds no activations)."""
        self.prev_r0: dict = {}      # slot -> block 0 residual of the last step (fp32, rows first)
        self.tail: dict = {}         # slot -> [tail residual (hidden), (encoder) or None, rows that hold one]
        self.plan: Optional[_Plan] = None
        self.step = None
        self.samples: Optional[int] = None
        self.decided: dict = {}      # sample -> action, this step
        self.step_actions: set = set()

    @torch.compiler.disable
    def set_bits(self, bits: int) -> None:
        for st in self.tracker.states:
            st.a_bits = bits

    @torch.compiler.disable
    def begin_call(self, x: torch.Tensor, hs: torch.Tensor, es: Optional[torch.Tensor]) -> None:
        """After block 0: decide the call's rows (``x`` block 0's hidden input, ``hs`` / ``es`` its outputs)."""
        tr, pol = self.tracker, self.policy
        step, slot, rows = tr.step_index, tr.slot, hs.shape[0]
        if step is None:
            self.plan = None
            return
        if step != self.step:
            self.step, self.decided, self.step_actions = step, {}, set()
            self.samples = rows // 2 if slot == "cond_uncond" and rows % 2 == 0 else rows
        if hasattr(pol, "set_device"):
            pol.set_device(hs.device.type)
        r0 = (hs.detach() - x.detach()).float()
        prev = self.prev_r0.get(slot)
        changes = None
        if prev is not None and prev.shape == r0.shape:
            den = prev.abs().flatten(1).sum(1).clamp_min(1e-12)
            changes = ((r0 - prev).abs().flatten(1).sum(1) / den).tolist()
        self.prev_r0[slot] = r0
        tail = self.tail.get(slot)
        valid = tail[2] if tail is not None and tail[0].shape[0] == rows else [False] * rows
        ns = self.samples if rows % self.samples == 0 else rows
        actions = []
        for row in range(rows):
            sample = row % ns
            if sample not in self.decided:
                self.decided[sample] = pol.decide(sample, step, tr.total_steps,
                                                  None if changes is None else changes[row], valid[row])
            act = self.decided[sample]
            actions.append(self.high if act == SKIP and not valid[row] else act)
        self.plan = _Plan(slot, actions, hs.detach(), None if es is None else es.detach())
        self.step_actions.update(actions)
        ran = [a for a in self.step_actions if a != SKIP]
        tr.schedule[-1] = max(ran) if ran else SKIP

    @torch.compiler.disable
    def end_call(self, h: torch.Tensor, e: Optional[torch.Tensor]) -> tuple:
        """After the last block: cache the tail residual of the rows that ran, add it to the rows that skipped."""
        plan, self.plan = self.plan, None
        self.set_bits(self.high)
        tail = self.tail.get(plan.slot)
        if tail is None or tail[0].shape != h.shape:
            tail = [torch.zeros_like(h), None if e is None else torch.zeros_like(e), [False] * plan.rows]
            self.tail[plan.slot] = tail
        skip = plan.groups.get(SKIP)
        ran = [i for i, a in enumerate(plan.actions) if a != SKIP]
        if plan.uniform is not None and plan.uniform != SKIP:
            tail[0] = (h - plan.out0_h).detach()
            if e is not None:
                tail[1] = (e - plan.out0_e).detach()
        elif ran:
            idx = torch.tensor(ran, device=h.device)
            tail[0][idx] = (h - plan.out0_h)[idx].detach()
            if e is not None:
                tail[1][idx] = (e - plan.out0_e)[idx].detach()
        for i in ran:
            tail[2][i] = True
        if skip is not None:
            h = h.clone()
            h[skip] = h[skip] + tail[0][skip]
            if e is not None:
                e = e.clone()
                e[skip] = e[skip] + tail[1][skip]
        return h, e


class _BlockHook(ModelHook):
    def __init__(self, run: PolicyRun, meta, last: bool = False):
        super().__init__()
        self.run, self.meta, self.last = run, meta, last

    def _io(self, out) -> tuple:
        """(hidden, encoder or None) of a block's output."""
        if isinstance(out, tuple):
            ei = self.meta.return_encoder_hidden_states_index
            return out[self.meta.return_hidden_states_index], (out[ei] if ei is not None else None)
        return out, None

    def _pack(self, like, h, e):
        if not isinstance(like, tuple):
            return h
        out = list(like)
        out[self.meta.return_hidden_states_index] = h
        if e is not None:
            out[self.meta.return_encoder_hidden_states_index] = e
        return tuple(out)

    def _inputs(self, args, kwargs) -> tuple:
        h = self.meta._get_parameter_from_args_kwargs("hidden_states", args, kwargs)
        e = None
        if self.meta.return_encoder_hidden_states_index is not None:
            e = self.meta._get_parameter_from_args_kwargs("encoder_hidden_states", args, kwargs)
        return h, e


class PolicyHeadHook(_BlockHook):
    """Block 0: run at high bits, then let the policy decide the call's rows."""

    def new_forward(self, module, *args, **kwargs):
        if len(module._diffusers_hook.hooks) > 1:
            raise DVDQuantError(f"dvdquant's step policy cannot run with other hooks on the transformer blocks "
                                f"({', '.join(module._diffusers_hook.hooks)}): disable the diffusers cache")
        x, _ = self._inputs(args, kwargs)
        self.run.set_bits(self.run.high)
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.run.begin_call(x, *self._io(out))
        return out


class PolicyTailHook(_BlockHook):
    """Blocks 1…L−1: run the rows at their bits, pass the skipped rows through; the last one closes the call.
    The bookkeeping runs outside ``torch.compile`` (``PolicyRun``'s methods); the blocks' own forwards do not."""

    def new_forward(self, module, *args, **kwargs):
        plan = self.run.plan
        if plan is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        if plan.uniform is not None and plan.uniform != SKIP:
            self.run.set_bits(plan.uniform)
            out = self.fn_ref.original_forward(*args, **kwargs)
            h, e = self._io(out)
        else:
            h, e = self._inputs(args, kwargs)
            out = (h, e) if e is not None else h
            if plan.uniform is None:
                h, e = h.clone(), None if e is None else e.clone()
                for act, idx in plan.groups.items():
                    if act == SKIP:
                        continue
                    self.run.set_bits(act)
                    sub = self.fn_ref.original_forward(*_take(args, idx, plan.rows), **_take(kwargs, idx, plan.rows))
                    sh, se = self._io(sub)
                    h[idx] = sh
                    if e is not None:
                        e[idx] = se
                out = sub if isinstance(sub, tuple) else h
        if self.last:
            h, e = self.run.end_call(h, e)
        return self._pack(out, h, e)


def install_policy_hooks(model: nn.Module, tracker) -> PolicyRun:
    """Register the step policy's hooks on ``model``'s transformer blocks, driven by ``tracker``'s policy."""
    from diffusers.hooks._helpers import TransformerBlockRegistry
    remove_policy_hooks(model)
    blocks = transformer_blocks(model)
    if len(blocks) < 2:
        raise DVDQuantError(f"the step policy needs 2 or more transformer blocks; {type(model).__name__} has "
                            f"{len(blocks)}")
    metas = []
    for b in blocks:
        try:
            metas.append(TransformerBlockRegistry.get(type(b)))
        except ValueError:
            raise DVDQuantError(f"the step policy does not know the outputs of {type(b).__name__} (diffusers has "
                                "no block metadata for it)") from None
    run = PolicyRun(tracker, len(blocks))
    for i, (b, meta) in enumerate(zip(blocks, metas)):
        hook = PolicyHeadHook(run, meta) if i == 0 else PolicyTailHook(run, meta, last=i == len(blocks) - 1)
        HookRegistry.check_if_exists_or_initialize(b).register_hook(hook, HEAD_HOOK if i == 0 else TAIL_HOOK)
    tracker.reset_callbacks.append(run.reset)
    return run


def remove_policy_hooks(model: nn.Module) -> None:
    for b in transformer_blocks(model):
        registry = getattr(b, "_diffusers_hook", None)
        for name in (HEAD_HOOK, TAIL_HOOK):
            hook = registry.get_hook(name) if registry is not None else None
            if hook is not None:
                registry.remove_hook(name, recurse=False)
                hook.run.release()
                if hook.run.reset in hook.run.tracker.reset_callbacks:
                    hook.run.tracker.reset_callbacks.remove(hook.run.reset)
