"""The public entry point: ``quantize_(model, config)`` swaps Linear layers for QuantLinear in place.

    import dvdquant
    report = dvdquant.quantize_(transformer, dvdquant.DVDQuantConfig(w_bits=4, a_bits=4))
    print(report)

Layer selection comes from the model's adapter (or ``filter_fn``); the method from the
registry, by config type. All quantized layers share one :class:`RuntimeState`, which the
diffusers step hook that ``quantize_`` registers on the model drives during sampling (step
index, δ-GBS bits; :mod:`dvdquant.nn.step_hooks`), inside any pipeline that calls the model.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import baselines  # noqa: F401  (registers the baseline methods)
from .algorithms import FixedBits, GBSController, get_method
from .algorithms.step_policy import StepPolicy
from .errors import DVDQuantError
from .kernels import ExecutionConfig
from .models.adapters import adapter_for, select_linears, weight_only_layers
from .nn import attention as qattn
from .nn.fused import install_fused_projections, remove_fused_projections
from .nn.policy_hooks import install_policy_hooks, remove_policy_hooks
from .nn.quant_linear import QuantLinear
from .nn.state import STATE_ATTR, RuntimeState, get_state
from .nn.step_hooks import (StepTracker, install_step_hook, refuse_hooked_layers, remove_step_hook,  # noqa: F401
                             restack_step_hook, step_tracker)

log = logging.getLogger(__name__)
CONFIG_ATTR = "_dvdquant_config"


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    method: str
    w_bits: int
    a_bits: int
    w_err_minmax: float
    w_err: float
    extras: dict = field(default_factory=dict)


@dataclass
class QuantReport:
    method: str
    model_class: str
    layers: list
    seconds: float
    calibration_passes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def mean_w_err(self) -> float:
        return sum(l.w_err for l in self.layers) / max(len(self.layers), 1)

    @property
    def mean_w_err_minmax(self) -> float:
        return sum(l.w_err_minmax for l in self.layers) / max(len(self.layers), 1)

    def __str__(self) -> str:
        head = (f"{self.method} on {self.model_class}: {len(self.layers)} layers in {self.seconds:.2f} s, "
                f"calibration passes {self.calibration_passes}, mean weight rel. error "
                f"{self.mean_w_err:.4f} (MinMax {self.mean_w_err_minmax:.4f})")
        rows = [f"  {l.name:<52} {l.out_features:>6}x{l.in_features:<6} W{l.w_bits}A{l.a_bits} "
                f"err {l.w_err:.4f} (minmax {l.w_err_minmax:.4f})" for l in self.layers]
        return "\n".join([head] + rows)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model`` (replacing what was there)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _per_layer(model: nn.Module, config, names) -> dict:
    """name → config for ``names``: ``config.weight_only()`` for the modulation layers, else ``config``."""
    weight_only = weight_only_layers(model, names)
    wo_config = config.weight_only() if weight_only else None
    if weight_only:
        log.info("%d modulation layers quantized weight-only (W%dA16, %s)", len(weight_only), wo_config.w_bits,
                 get_method(wo_config).name)
    return {n: wo_config if n in weight_only else config for n in names}


def layer_configs(model: nn.Module, config, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> dict:
    """What ``quantize_(model, config, filter_fn)`` would do, layer by layer: {name: per-layer config}.

    Module order; weight-only (modulation) layers get ``config.weight_only()``. Looks only at
    names and types, so it works on a model built on the ``meta`` device.
    """
    targets = select_linears(model, config.skip, config.quantize_modulation, filter_fn)
    return _per_layer(model, config, [n for n, _ in targets])


def quantize_(model: nn.Module, config, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
              calibration: Optional[Callable[[nn.Module], None]] = None, progress: bool = False) -> QuantReport:
    """Quantize ``model``'s Linear layers in place with the method registered for ``config``.

    ``calibration(model)`` runs forward passes; only baselines that need activation statistics
    use it (SmoothQuant, ViDiT-Q-style). Modulation layers (the adapter's, see
    :func:`~dvdquant.models.adapters.weight_only_layers`) are quantized weight-only with
    ``config.weight_only()``. Returns a per-layer :class:`QuantReport`.
    """
    if not isinstance(model, nn.Module):
        raise DVDQuantError(f"quantize_ expects a torch.nn.Module, got {type(model).__name__}")
    if get_state(model) is not None:
        raise DVDQuantError(f"{type(model).__name__} is already quantized by dvdquant")
    method = get_method(config)
    targets = select_linears(model, config.skip, config.quantize_modulation, filter_fn)
    configs = _per_layer(model, config, [n for n, _ in targets])
    refuse_hooked_layers(model, configs)
    state = RuntimeState()
    t0 = time.perf_counter()
    stats = None
    if method.collect:
        # While calibrating, a step hook sets the step index that per-step statistics are keyed by.
        install_step_hook(model, StepTracker([state], FixedBits(), config.a_bits))
        try:
            stats = method.collect(model, [t for t in targets if configs[t[0]] is config], calibration, state,
                                   config)
        finally:
            remove_step_hook(model)
    layers = []
    with torch.no_grad():
        pending = dict(targets)
        del targets                               # drop references: each FP weight is freed once replaced
        for name, cfg in tqdm(configs.items(), desc=f"quantize {method.name}", disable=not progress, leave=False):
            linear = pending.pop(name)
            meth = method if cfg is config else get_method(cfg)
            qmod, info = meth.quantize_layer(name, linear, cfg, stats if cfg is config else None)
            qmod.state, qmod.layer_name = state, name
            set_submodule(model, name, qmod)
            layers.append(LayerReport(name, linear.in_features, linear.out_features, meth.name,
                                      cfg.w_bits, cfg.a_bits, info.w_err_minmax, info.w_err, info.extras))
    state.reset()
    attach_runtime(model, state, config)
    qattn.apply_config(model, config)             # DVDQuantConfig.attention: 8-bit attention (opt out: "none")
    report = QuantReport(method.name, type(model).__name__, layers, time.perf_counter() - t0,
                         stats.passes if stats is not None else 0)
    log.info("quantized %d layers of %s with %s in %.2f s", len(layers), report.model_class, method.name,
             report.seconds)
    return report


def quantized_layers(model: nn.Module) -> list:
    """[(name, QuantLinear)] of a quantized model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def set_backend(model: nn.Module, backend: str, *, fast_accum: bool = False, exact_rotation: bool = True,
                int8_gemm: bool = True, fuse_projections: bool = True,
                attention_path: str = "auto") -> ExecutionConfig:
    """Set how the quantized ``model`` runs: one :class:`~dvdquant.kernels.ExecutionConfig` of these
    fields (validated; ``ConfigError``), held on the model's ``RuntimeState`` for all its layers.

    ``backend``: "simulated" (the fp32 reference), "emulated", "fp8" or "auto". By default the fp8
    path computes the emulated path's bits for int-grid layers with per-token scales (exact rotation;
    exact integer GEMM: INT8 tensor cores, or FP8 ones with exact accumulation for A4 below sm90; the
    same epilogue order), so its clips are the emulated ones. The opt-ins trade that exactness for
    speed (docs/KERNELS.md): ``fast_accum`` (cuBLAS' reduced-precision FP8 accumulation; also sends A4
    to cuBLAS), ``exact_rotation=False`` (no snap of the online rotation: ~25 % cheaper activation
    kernel, a code on a rounding boundary can move one step), ``int8_gemm=False`` (int-grid steps on
    the FP8 GEMM: A4 codes through cuBLAS, the same bits, slower on sm90; A6/A8 as FP8 e4m3 values, a
    different 8-bit grid, logged once per layer).

    ``fuse_projections`` (any backend but "simulated"): where the model adapter lists sibling
    projections its attention processor can call as one (Wan's ``to_qkv`` / ``to_kv``), install them
    (:mod:`dvdquant.nn.fused`): the fp8 path then quantizes the shared tokens once and runs one GEMM,
    with the same outputs bit for bit. ``attention_path``: where installed 8-bit attention runs
    ("auto": the Triton kernel on sm89+, the emulated reference on CPU; "triton"; "emulated").
    Checkpoints and state dicts are unchanged. Returns the config.
    """
    execution = ExecutionConfig(backend, fast_accum, exact_rotation, int8_gemm, fuse_projections, attention_path)
    layers = [m for _, m in quantized_layers(model)]
    states = {id(m.state): m.state for m in layers if m.state is not None}
    if any(m.state is None for m in layers):                 # bare QuantLinears: the model's state, or one new one
        shared = get_state(model) or RuntimeState()
        states[id(shared)] = shared
        for m in layers:
            if m.state is None:
                m.state = shared
    for state in states.values():
        state.execution = execution
    remove_fused_projections(model)
    adapter = adapter_for(model)
    if backend != "simulated" and fuse_projections and adapter is not None and adapter.fused_projections:
        n = install_fused_projections(model, adapter.fused_projections)
        log.info("fused sibling projections in %d attention modules", n)
    mode = qattn.quantized_attention_mode(model)
    if mode is not None and qattn.quantized_attention_path(model) != attention_path:
        qattn.install_quantized_attention(model, mode, attention_path)
    return execution


def attach_runtime(model: nn.Module, state: RuntimeState, config) -> StepTracker:
    """Attach the quantized model's state and config, and register its diffusers step hook."""
    setattr(model, STATE_ATTR, state)
    setattr(model, CONFIG_ATTR, config)
    tracker = install_step_hook(model, _new_tracker([state], config)).tracker
    _install_policy(model, tracker)
    return tracker


def _new_tracker(states: list, config) -> StepTracker:
    gbs, policy = getattr(config, "gbs", None), getattr(config, "policy", None)
    chosen = StepPolicy(policy) if policy is not None else GBSController(gbs) if gbs is not None else FixedBits()
    return StepTracker(states, chosen, config.a_bits)


def _install_policy(model: nn.Module, tracker: StepTracker) -> None:
    remove_policy_hooks(model)
    if isinstance(tracker.policy, StepPolicy):
        install_policy_hooks(model, tracker)


def set_step_policy(model: nn.Module, policy) -> StepTracker:
    """Give a quantized model dvdquant's step policy (a :class:`~dvdquant.config.StepPolicyConfig`; None:
    back to the config's δ-GBS or fixed bits); its config (and so a checkpoint saved next) records it."""
    from dataclasses import replace
    config = getattr(model, CONFIG_ATTR, None)
    if get_state(model) is None or config is None:
        raise DVDQuantError(f"{type(model).__name__} is not quantized by dvdquant: quantize_ or load it first")
    if "policy" not in {f for f in getattr(config, "__dataclass_fields__", {})}:
        raise DVDQuantError(f"the step policy applies to DVD-Quant configs, not {type(config).__name__}")
    config = replace(config, policy=policy, gbs=None if policy is not None else config.gbs)
    setattr(model, CONFIG_ATTR, config)
    tracker = install_step_hook(model, _new_tracker([get_state(model)], config)).tracker
    _install_policy(model, tracker)
    return tracker


def step_controller(model: nn.Module) -> Optional[StepTracker]:
    """The step runtime of a quantized model: ``.schedule`` (activation bits per step of the current or
    last pipeline call; 0 for a step served from a cache), ``.coverage`` (share of a full step's block
    work that ran), ``.skipped_steps()``, ``.changes``, ``.indicators``, ``.mean_bits()`` (over the work
    that ran), ``.reset()``, ``.total_steps``. None for a model that ``quantize_`` / ``load`` did not prepare."""
    return step_tracker(model)


def share_step_controller(*models: nn.Module) -> StepTracker:
    """One step controller for several quantized transformers of one pipeline (Wan 2.2's high- and
    low-noise experts): step index, δ-GBS accumulator and output change run across all of them, as
    one denoising loop. The first model's configuration decides the policy; δ-GBS settings must agree."""
    if len(models) < 2:
        raise DVDQuantError("share_step_controller needs two or more quantized models")
    states, configs = [], []
    for m in models:
        if get_state(m) is None:
            raise DVDQuantError(f"{type(m).__name__} is not quantized by dvdquant: quantize_ or load it first")
        states.append(get_state(m))
        configs.append(getattr(m, CONFIG_ATTR))
    if len({repr(getattr(c, "gbs", None)) for c in configs}) != 1:
        raise DVDQuantError("the models' δ-GBS settings differ: " +
                            " vs ".join(repr(getattr(c, "gbs", None)) for c in configs))
    if len({repr(getattr(c, "policy", None)) for c in configs}) != 1:
        raise DVDQuantError("the models' step policy settings differ")
    tracker = _new_tracker(states, configs[0])
    for m in models:
        install_step_hook(m, tracker)
        _install_policy(m, tracker)
    return tracker
