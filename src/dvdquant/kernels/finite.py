"""NaN/Inf detection on the FP8 path without a device synchronisation per layer.

Why: raising on NaN/Inf inputs needs the answer on the host. Asking for it in every layer
(``bool(torch.isfinite(s).all())``) blocks the CPU until the GPU has caught up, 2 × ~400 times
per HunyuanVideo step, so the CPU can never run ahead to queue kernels. Instead the activation kernel itself records the
*smallest id of a layer whose input held NaN/Inf* in a 1-element int32 flag on the device (an
``atomic_min`` only in programs that saw a bad row, so no cost otherwise), and the host reads
the flag once per denoising step (the pipeline's step hooks call :func:`raise_if_nonfinite`).

Modes (environment ``DVDQUANT_FINITE_CHECK``):

* ``step`` (default) — the device flag above; the error names the first bad layer and is
  raised at the end of the step it happened in;
* ``layer`` — the old behaviour: one sync per layer, the error is raised in the layer itself;
* ``off`` — no detection (``DVDQUANT_SKIP_FINITE_CHECK=1`` is an alias).

This module imports neither triton nor diffusers.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

from ..errors import ConfigError, NonFiniteError

CLEAN = 2 ** 31 - 1                  # flag value meaning "no layer saw NaN/Inf"
MODES = ("step", "layer", "off")
_FLAGS: Dict[str, torch.Tensor] = {}  # str(device) → (1,) int32 flag
_LAYER_IDS: Dict[str, int] = {}
_LAYER_NAMES: List[str] = []


def finite_check_mode() -> str:
    """The detection mode from the environment (see the module docstring)."""
    if os.environ.get("DVDQUANT_SKIP_FINITE_CHECK", "0") not in ("", "0"):
        return "off"
    mode = os.environ.get("DVDQUANT_FINITE_CHECK", "step") or "step"
    if mode not in MODES:
        raise ConfigError(f"DVDQUANT_FINITE_CHECK={mode!r}: expected one of {MODES}")
    return mode


def device_flag(device) -> torch.Tensor:
    """The (1,) int32 flag of ``device``, created clean on first use."""
    key = str(torch.device(device))
    flag = _FLAGS.get(key)
    if flag is None:
        flag = torch.full((1,), CLEAN, dtype=torch.int32, device=device)
        _FLAGS[key] = flag
    return flag


def layer_id(name: str) -> int:
    """A stable small integer for a layer name (ids follow first use, i.e. call order)."""
    name = name or "?"
    if name not in _LAYER_IDS:
        _LAYER_IDS[name] = len(_LAYER_NAMES)
        _LAYER_NAMES.append(name)
    return _LAYER_IDS[name]


def layer_key(name: str) -> torch.Tensor:
    """The (1,) int64 CPU tensor of :func:`layer_id` (``name``): how a layer names itself to the FP8 ops. A tensor,
    not the string, so ``torch.compile`` does not guard on its value: layers of the same form (one per block)
    share one compiled frame. Read in the op on the host (no device synchronisation)."""
    return torch.tensor([layer_id(name)], dtype=torch.int64)


def layer_name_of(key: torch.Tensor) -> str:
    """The layer name behind a :func:`layer_key` tensor ("?" for an unknown id)."""
    i = int(key.reshape(-1)[0])
    return _LAYER_NAMES[i] if 0 <= i < len(_LAYER_NAMES) else "?"


def first_nonfinite_layer(device=None, reset: bool = True) -> Optional[str]:
    """Name of the first layer (by id) whose input held NaN/Inf since the last reset, else None.

    Reads the flag of ``device`` (every device with a flag when None): one synchronisation.
    """
    keys = [str(torch.device(device))] if device is not None else list(_FLAGS)
    found = None
    for key in keys:
        flag = _FLAGS.get(key)
        if flag is None:
            continue
        v = int(flag.item())
        if v != CLEAN:
            if reset:
                flag.fill_(CLEAN)
            name = _LAYER_NAMES[v] if 0 <= v < len(_LAYER_NAMES) else f"#{v}"
            found = found or name
    return found


def raise_if_nonfinite(device=None) -> None:
    """Raise :class:`NonFiniteError` if a layer on the FP8 path saw NaN/Inf inputs (and reset)."""
    name = first_nonfinite_layer(device)
    if name is not None:
        raise NonFiniteError(f"layer {name}: input activations hold NaN/Inf (detected at the end of the "
                             "denoising step; DVDQUANT_FINITE_CHECK=layer stops in the layer itself)")
