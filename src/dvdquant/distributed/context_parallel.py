"""Context-parallel inference (sequence parallelism) of a quantized or FP diffusers transformer.

Inference runs through diffusers' own engine (``ContextParallelConfig``, Ulysses and/or ring
attention; the model's ``_cp_plan`` says where the sequence is split and gathered). For Wan the
plan splits ``hidden_states`` along the token axis at ``blocks.0`` and all-gathers the output of
``proj_out``, so every Linear inside the blocks — i.e. every quantized layer — sees only this
rank's slice of the tokens. What that changes for a quantized layer:

* per-token activation quantization and ARQ ``per_block`` scales (per token and 128 channels)
  are local to a token: unchanged;
* ARQ ``per_channel`` auto-scaling Λ_t (and dynamic smoothing's s_t) is a *max over each
  sample's tokens*: a rank would see the max over its slice only. :func:`enable_context_parallel`
  stores the context-parallel process group on the model's :class:`~dvdquant.nn.state.RuntimeState`,
  and the layers all-reduce (MAX) that per-sample (B, K) statistic over it
  (``RuntimeState.all_tokens_max``): one small collective per layer call, and the same Λ_t as on
  one device;
* δ-GBS's indicator reads the model output, which the plan has already gathered: every rank
  computes the same L1 change and picks the same bits;
* cross-attention K/V projections see the full text on every rank (the plan does not split
  ``encoder_hidden_states``); reducing their identical maxima is a no-op.

``enable_context_parallel`` calls ``transformer.enable_parallelism``. diffusers 0.42.1 computes
``rank % torch.accelerator.device_count()`` there, which divides by zero on a CPU-only torch;
on such a build (the CPU tests, gloo) this module performs the same three steps itself with
diffusers' functions: ``ParallelConfig.setup`` on a CPU device mesh, the attention processors'
``_parallel_config``, and ``apply_context_parallel`` with the model's plan.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import DVDQuantError
from ..nn.attention import attention_modules
from ..nn.state import get_state

log = logging.getLogger(__name__)
CP_PLAN_ATTR = "_dvdquant_cp_plan"


def _require_initialized() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise DVDQuantError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                            "(or start with torchrun) before enabling context parallelism")


def _attention_processors(model: nn.Module) -> list:
    """The processors of the model's diffusers attention modules (they take a ``_parallel_config``)."""
    return [m.processor for _, m in attention_modules(model)]


def _active_backend(model: nn.Module):
    """The attention backend (diffusers ``AttentionBackendName``) the model's processors dispatch to."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    for proc in _attention_processors(model):
        if hasattr(proc, "_attention_backend"):
            name = proc._attention_backend
            return _AttentionBackendRegistry.get_active_backend()[0] if name is None else AttentionBackendName(name)
    return _AttentionBackendRegistry.get_active_backend()[0]


def _check_cp_request(model: nn.Module, cp_config, world: int) -> None:
    degree = cp_config.ring_degree * cp_config.ulysses_degree
    if degree != world:
        raise DVDQuantError(f"ring_degree × ulysses_degree = {degree} must equal the world size {world}")
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if cp_config.ulysses_degree > 1 and heads is not None and heads % cp_config.ulysses_degree \
            and not cp_config.ulysses_anything:
        raise DVDQuantError(f"{type(model).__name__} has {heads} attention heads, not divisible by "
                            f"ulysses_degree={cp_config.ulysses_degree}")
    backend = _active_backend(model)
    if cp_config.ring_degree > 1 and backend.value == "native":
        raise DVDQuantError("ring attention needs an attention backend that returns the log-sum-exp "
                            "(e.g. '_native_cudnn', 'flash'); diffusers' 'native' (SDPA) backend does not: "
                            "call model.set_attention_backend(...) first or use ulysses_degree")


def _enable_without_accelerator(model: nn.Module, cp_config, plan: dict) -> None:
    """``enable_parallelism``'s context-parallel steps for a CPU-only torch (see the module docstring)."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ParallelConfig
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    from torch.distributed.device_mesh import init_device_mesh
    if getattr(model, "_parallel_config", None) is not None:
        raise DVDQuantError(f"parallelism is already applied to this {type(model).__name__}")
    backend = _active_backend(model)
    if not _AttentionBackendRegistry._is_context_parallel_available(backend):
        raise DVDQuantError(f"attention backend {backend.value!r} does not support context parallelism")
    mesh = cp_config.mesh or init_device_mesh("cpu", cp_config.mesh_shape, mesh_dim_names=cp_config.mesh_dim_names)
    config = ParallelConfig(context_parallel_config=cp_config)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    model._parallel_config = config
    for proc in _attention_processors(model):
        if hasattr(proc, "_parallel_config"):
            proc._parallel_config = config
    apply_context_parallel(model, cp_config, plan)


def _ensure_logger_warning_once() -> None:
    """diffusers' context-parallel hooks call ``logger.warning_once``, which only exists once
    ``transformers`` has patched ``logging.Logger`` (diffusers 0.42.1 does not define it): without
    transformers installed, a benign warning path then crashes. Add a once-per-message warning."""
    if hasattr(logging.Logger, "warning_once"):
        return
    seen: set = set()

    def warning_once(self, msg, *args, **kwargs):
        if (self.name, msg) not in seen:
            seen.add((self.name, msg))
            self.warning(msg, *args, **kwargs)

    logging.Logger.warning_once = warning_once
    log.debug("added logging.Logger.warning_once for diffusers' context-parallel hooks")


def enable_context_parallel(model: nn.Module, cp_config=None, *, ulysses_degree: Optional[int] = None,
                            ring_degree: Optional[int] = None, cp_plan: Optional[dict] = None):
    """Run ``model`` (a diffusers transformer, quantized or not) context-parallel over all ranks.

    Pass a diffusers ``ContextParallelConfig`` or the degrees (default: Ulysses over every rank).
    Call it *after* ``dvdquant.quantize_`` / ``dvdquant.load``, on every rank, with the same
    weights and inputs on every rank. Returns the ``ContextParallelConfig`` in use.
    """
    _require_initialized()
    _ensure_logger_warning_once()
    if not hasattr(model, "enable_parallelism"):
        raise DVDQuantError(f"{type(model).__name__} is not a diffusers model (no enable_parallelism)")
    plan = cp_plan if cp_plan is not None else getattr(model, "_cp_plan", None)
    if plan is None:
        raise DVDQuantError(f"{type(model).__name__} has no context-parallel plan (_cp_plan): pass cp_plan=")
    from diffusers import ContextParallelConfig
    world = dist.get_world_size()
    if cp_config is None:
        if ulysses_degree is None and ring_degree is None:
            ulysses_degree = world
        cp_config = ContextParallelConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree)
    _check_cp_request(model, cp_config, world)
    if torch.accelerator.device_count() > 0:
        model.enable_parallelism(config=cp_config, cp_plan=plan)
    else:
        _enable_without_accelerator(model, cp_config, plan)
    setattr(model, CP_PLAN_ATTR, plan)
    group = cp_config._flattened_mesh.get_group()
    state = get_state(model)
    if state is not None:
        state.process_group = group          # QuantLinear: per-channel maxima over every rank's tokens
    log.info("context parallel on %d ranks (ulysses %d × ring %d), %s", world, cp_config.ulysses_degree,
             cp_config.ring_degree, "quantized layers synchronised" if state is not None else "not quantized")
    return cp_config


def disable_context_parallel(model: nn.Module) -> None:
    """Undo :func:`enable_context_parallel`: remove the split/gather hooks, run single-device again."""
    from diffusers.hooks.context_parallel import remove_context_parallel
    config = getattr(model, "_parallel_config", None)
    if config is None or config.context_parallel_config is None:
        return
    remove_context_parallel(model, getattr(model, CP_PLAN_ATTR, None) or model._cp_plan)
    for proc in _attention_processors(model):
        if hasattr(proc, "_parallel_config"):
            proc._parallel_config = None
    model._parallel_config = None
    state = get_state(model)
    if state is not None:
        state.process_group = None
