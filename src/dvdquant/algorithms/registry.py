"""Registry of quantization methods, keyed by config class.

``quantize_`` looks the method up by ``type(config)``; adding a method means writing a layer
function and registering it, never another ``if method == ...`` branch.

A method has two parts:

* ``collect(model, targets, calibration, state, config) -> stats`` (optional): statistics a
  method needs from forward passes (only the baselines use it; DVD-Quant is data-free);
* ``quantize_layer(name, linear, config, stats) -> (QuantLinear, LayerInfo)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..errors import ConfigError


@dataclass
class LayerInfo:
    """What happened to one layer: weight error of this method and of MinMax on the same tensor."""

    w_err: float                   # ‖W − Ŵ‖ / ‖W‖ (in the transformed basis; rotations are orthogonal)
    w_err_minmax: float            # same for plain MinMax on the same (transformed) weight
    extras: dict = field(default_factory=dict)


@dataclass(frozen=True)
class QuantMethod:
    name: str
    config_cls: type
    quantize_layer: Callable[..., Any]
    collect: Optional[Callable[..., Any]] = None
    data_free: bool = True
    description: str = ""


_REGISTRY: dict[type, QuantMethod] = {}


def register_method(method: QuantMethod) -> QuantMethod:
    if method.config_cls in _REGISTRY:
        raise ConfigError(f"a method is already registered for {method.config_cls.__name__}")
    _REGISTRY[method.config_cls] = method
    return method


def get_method(config) -> QuantMethod:
    try:
        return _REGISTRY[type(config)]
    except KeyError:
        known = ", ".join(sorted(c.__name__ for c in _REGISTRY)) or "none"
        raise ConfigError(f"no quantization method registered for {type(config).__name__} "
                          f"(known configs: {known})") from None


def registered_methods() -> dict[str, QuantMethod]:
    return {m.name: m for m in _REGISTRY.values()}
