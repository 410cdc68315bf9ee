"""Registry of quantization methods, keyed by config class: the only list of methods.

``quantize_`` looks the method up by ``type(config)``; the CLI's ``--method`` choices, checkpoint
loading (:func:`config_from_dict`) and the evaluation's baseline rows are read from here. Adding a
method means one config class (``config.py``) and one ``register_method`` call (see
``baselines/methods.py``), never another ``if method == ...`` branch or list. The built-in methods
register when ``dvdquant`` is imported (its ``api`` imports ``algorithms.dvd`` and ``baselines``).

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
    label: str = ""                # display name in reports (default: ``name``)
    baseline: bool = True          # a row of the evaluation's baselines (False: DVD-Quant itself)

    def display(self) -> str:
        return self.label or self.name


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
    """{name: method} in registration order (DVD-Quant first, then the baselines)."""
    return {m.name: m for m in _REGISTRY.values()}


def method_by_name(name: str) -> QuantMethod:
    methods = registered_methods()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r} (known: {', '.join(sorted(methods))})")
    return methods[name]


def config_from_dict(d: dict):
    """A config from :func:`dvdquant.config.config_to_dict`'s dict, its class found among the registered
    methods' configs; raises ConfigError on an unknown type."""
    from ..config import config_from_fields
    classes = {m.config_cls.__name__: m.config_cls for m in registered_methods().values()}
    cls = classes.get(d.get("type"))
    if cls is None:
        raise ConfigError(f"unknown config type {d.get('type')!r} (known: {', '.join(classes)})")
    return config_from_fields(cls, d["fields"])
