"""Quantized checkpoints: safetensors tensors + a versioned JSON header; atomic writes.

One ``.safetensors`` file holds the whole quantized model's state dict — packed weight codes
(``*.qweight``, uint8: int4 two per byte; other widths below 8 bits packed densely, ⌈K·b/8⌉ bytes
per row, the layer's header entry saying ``packed_bits``), fp32 scales and zero points, smoothing/balance
tables, and the untouched high-precision layers — and, in the safetensors metadata under the
key ``"dvdquant"``, a JSON document:

``format_version``, ``library_version``, ``method``, ``config`` (type + fields),
``model_class`` and ``model_config`` (the diffusers config, so the model can be rebuilt with
no original weights), ``layers`` (per-layer settings) and ``tensors_sha256`` (over every
tensor, in sorted name order). Loading checks all of it and raises :class:`CheckpointError`
with one line for a truncated/corrupted file, a broken header, an unknown version, or another
model. Format version 2 is version 1 plus dense ``packed_bits`` layers; version 3 adds layers with
an exact block-mean term (``"mean_channel": "exact"`` in the layer entry, tensor ``*.w_block_sum``
(N, K/R) fp32; DVD-Quant ``mean_channel="exact"``); version 4 adds layers with dynamic smoothing
(DVD-Quant ``smoothing="dynamic"``): the entry's ``"smoothing": {"alpha", "master_bits", "symmetric"}``
and the master weight's tensors ``*.w_master`` (N, K) — int8 codes of W/max|W_j| with ``*.w_master_scale``
(N, 1) fp32 when ``master_bits`` is 8, fp32 W when 16 — and ``*.w_colmax`` (K,) fp32. Such a layer's
``qweight`` / ``w_scale`` / ``w_zero`` are not stored: its forward re-quantizes the master every call
and never reads them, and load rebuilds them from the master (Q_RTN(W_master·H)), bit for bit.
A checkpoint is written at the lowest version that holds it, so older readers still load what they
can and refuse the rest with one line; a layer entry without ``mean_channel`` is ``"quantized"`` (no
mean term), one without ``smoothing`` has none.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ._version import __version__
from .algorithms.registry import config_from_dict
from .api import CONFIG_ATTR, attach_runtime, quantized_layers, set_submodule
from .config import config_to_dict
from .errors import CheckpointError
from .fileio import atomic_path
from .nn import attention as qattn
from .nn.quant_linear import QuantLinear
from .nn.state import RuntimeState, get_state
from .nn.step_hooks import refuse_hooked_layers
from .numerics.packing import pack_bits, unpack_bits

log = logging.getLogger(__name__)
FORMAT_VERSION = 4      # written when a layer has dynamic smoothing; 3: an exact mean term; 2: dense-packed; else 1
READ_VERSIONS = (1, 2, 3, 4)
_DERIVED = ("qweight", "w_scale", "w_zero")            # rebuilt from the master on load for dynamic smoothing
_LAYER_KEYS = ("in_features", "out_features", "w_bits", "group_size", "a_bits", "a8_format", "rotation_block",
               "auto_scale", "scale_block")


def tensors_sha256(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def layer_meta(m: QuantLinear) -> dict:
    """A quantized layer's settings as stored in a checkpoint header (see :func:`quant_linear_from_meta`)."""
    d = {k: getattr(m, k) for k in _LAYER_KEYS}
    d.update(has_bias=m.bias is not None, smooth_steps=0 if m.smooth is None else m.smooth.shape[0],
             balance_steps=0 if m.act_balance is None else m.act_balance.shape[0],
             bias_dtype=str(m.bias.dtype).replace("torch.", "") if m.bias is not None else "float32")
    if getattr(m, "w_block_sum", None) is not None:
        d["mean_channel"] = "exact"
    if getattr(m, "dyn_alpha", None) is not None:
        d["smoothing"] = {"alpha": m.dyn_alpha, "master_bits": 8 if m.w_master_scale is not None else 16,
                          "symmetric": m.w_symmetric}
    return d


def _smoothing_entry(meta: dict) -> Optional[dict]:
    """A layer entry's dynamic-smoothing settings, checked (None: the layer has none)."""
    sm = meta.get("smoothing")
    if sm is None:
        return None
    ok = (isinstance(sm, dict) and isinstance(sm.get("alpha"), (int, float)) and not isinstance(sm["alpha"], bool)
          and 0.0 <= sm["alpha"] <= 1.0 and sm.get("master_bits") in (8, 16) and isinstance(sm.get("symmetric"), bool)
          and meta.get("mean_channel", "quantized") == "quantized" and not meta["smooth_steps"])
    if not ok:
        raise CheckpointError(f"checkpoint layer entry has smoothing={sm!r}; expected {{'alpha': 0..1, 'master_bits': "
                              "8 or 16, 'symmetric': true/false}} on a layer without a mean term or static smoothing")
    return sm


def quant_linear_from_meta(meta: dict, device) -> QuantLinear:
    """An empty QuantLinear (tensors to be loaded) with the settings of :func:`layer_meta`'s entry."""
    mean = meta.get("mean_channel", "quantized")
    if mean not in ("quantized", "exact") or (mean == "exact" and not meta["rotation_block"]):
        raise CheckpointError(f"checkpoint layer entry has mean_channel={mean!r} with rotation_block="
                              f"{meta['rotation_block']!r}; expected 'quantized', or 'exact' on a rotated layer")
    sm = _smoothing_entry(meta)
    q = QuantLinear(meta["in_features"], meta["out_features"], w_bits=meta["w_bits"],
                    group_size=meta["group_size"], a_bits=meta["a_bits"], a8_format=meta["a8_format"],
                    rotation_block=meta["rotation_block"], auto_scale=meta["auto_scale"],
                    scale_block=meta["scale_block"], has_bias=meta["has_bias"],
                    smooth_steps=meta["smooth_steps"], balance_steps=meta["balance_steps"],
                    bias_dtype=getattr(torch, meta["bias_dtype"]),
                    exact_mean=mean == "exact", device=device)
    if sm is not None:
        q.empty_dynamic_smoothing(sm["alpha"], sm["master_bits"], sm["symmetric"])
    return q


def _dense_bits(m: QuantLinear) -> Optional[int]:
    """The width at which ``m``'s codes are stored densely, or None (int4-packed or 8-bit: as in memory;
    dynamic smoothing: not stored)."""
    return None if m.packed or m.w_bits >= 8 or m.dyn_alpha is not None else int(m.w_bits)


def _pack_dense(tensors: dict, layers: dict) -> None:
    for name, lm in layers.items():
        if lm.get("packed_bits"):
            tensors[f"{name}.qweight"] = pack_bits(tensors[f"{name}.qweight"], lm["packed_bits"])


def _unpack_dense(tensors: dict, meta: dict, path: Path) -> None:
    for name, lm in meta["layers"].items():
        bits, key = lm.get("packed_bits"), f"{name}.qweight"
        if bits and key in tensors:
            try:
                tensors[key] = unpack_bits(tensors[key], int(bits), int(lm["in_features"]))
            except ValueError as e:
                raise CheckpointError(f"checkpoint {path}: layer {name}: {e}") from None


def _model_config(model: nn.Module) -> Optional[dict]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    # diffusers' private keys (``_use_default_values``: a set, listed in hash order) would make the
    # header differ between processes; they are not part of the architecture
    public = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
    return json.loads(json.dumps(public, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def save(model: nn.Module, path, extra: Optional[dict] = None) -> Path:
    """Write a quantized model to ``path`` (.safetensors) atomically; returns the path."""
    if get_state(model) is None:
        raise CheckpointError(f"{type(model).__name__} is not quantized: run dvdquant.quantize_ first")
    path = Path(path)
    derived = {f"{n}.{b}" for n, m in quantized_layers(model) if m.dyn_alpha is not None for b in _DERIVED}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in derived}
    layers = {n: dict(layer_meta(m), **({"packed_bits": _dense_bits(m)} if _dense_bits(m) else {}))
              for n, m in quantized_layers(model)}
    _pack_dense(tensors, layers)
    meta = {
        "format_version": _version_for(layers), "library_version": __version__,
        "method": type(getattr(model, CONFIG_ATTR)).__name__, "config": config_to_dict(getattr(model, CONFIG_ATTR)),
        "model_class": type(model).__name__, "model_module": type(model).__module__,
        "model_config": _model_config(model),
        "layers": layers,
        "tensors_sha256": tensors_sha256(tensors), "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"dvdquant": json.dumps(meta)})
    log.info("saved %d quantized layers to %s", len(meta["layers"]), path)
    return path


def _version_for(layers: dict) -> int:
    """The lowest format version that holds these layer entries."""
    if any("smoothing" in lm for lm in layers.values()):
        return 4
    if any("mean_channel" in lm for lm in layers.values()):
        return 3
    return 2 if any("packed_bits" in lm for lm in layers.values()) else 1


def read_metadata(path) -> dict:
    """The checkpoint's JSON header (raises CheckpointError if it is not a dvdquant checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("dvdquant")
    except Exception as e:  # safetensors raises its own error types for truncated headers
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not safetensors): {e}") from None
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a dvdquant checkpoint (no 'dvdquant' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path} has a broken JSON header ({e.msg} at char {e.pos})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} has a broken header (a JSON {type(meta).__name__}, not an object)")
    if meta.get("format_version") not in READ_VERSIONS:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('format_version')!r}; "
                              f"this dvdquant ({__version__}) reads versions "
                              f"{', '.join(map(str, READ_VERSIONS))}")
    return meta


def _read_tensors(path: Path, meta: dict) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted: {e}") from None
    if tensors_sha256(tensors) != meta.get("tensors_sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupted: tensor SHA-256 does not match its header")
    _unpack_dense(tensors, meta, path)
    return tensors


def _check_zero_points(tensors: dict, meta: dict, path: Path) -> None:
    """Zero points must be the integers 0 … 2^b − 1 that the weight quantizers produce: the FP8
    expansion table and the int4 GEMV rely on it (a checked, well-formed file could still carry
    other values if it was written by something else)."""
    for name, lm in meta["layers"].items():
        z = tensors.get(f"{name}.w_zero")
        if z is None:
            continue
        qmax = 2 ** int(lm["w_bits"]) - 1
        zf = z.float()
        if not bool(((zf >= 0) & (zf <= qmax) & (zf == zf.round())).all()):
            raise CheckpointError(f"checkpoint {path}: layer {name} has zero points outside the integers "
                                  f"0..{qmax} of its {lm['w_bits']}-bit grid")


def _dynamic_layers(meta: dict) -> list:
    return [n for n, lm in meta["layers"].items() if "smoothing" in lm]


def _check_master_tensors(tensors: dict, meta: dict, path: Path) -> None:
    """Every dynamic-smoothing layer's master tensors are there, with their shapes and dtypes (load_state_dict
    would cast a wrong dtype silently)."""
    for name in _dynamic_layers(meta):
        lm = meta["layers"][name]
        if meta["format_version"] < 4:
            raise CheckpointError(f"checkpoint {path}: layer {name} has dynamic smoothing in a format version "
                                  f"{meta['format_version']} header (it needs version 4)")
        sm = _smoothing_entry(lm)
        n, k, eight = lm["out_features"], lm["in_features"], sm["master_bits"] == 8
        want = {"w_master": ((n, k), torch.int8 if eight else torch.float32), "w_colmax": ((k,), torch.float32)}
        if eight:
            want["w_master_scale"] = ((n, 1), torch.float32)
        elif f"{name}.w_master_scale" in tensors:
            raise CheckpointError(f"checkpoint {path}: layer {name} has a 16-bit master weight and a "
                                  "w_master_scale tensor (only 8-bit masters have one)")
        for key, (shape, dtype) in want.items():
            t = tensors.get(f"{name}.{key}")
            if t is None:
                raise CheckpointError(f"checkpoint {path}: layer {name} has dynamic smoothing in its header but "
                                      f"no {key} tensor")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise CheckpointError(f"checkpoint {path}: layer {name}: {key} is {t.dtype} {tuple(t.shape)}, "
                                      f"expected {dtype} {shape}")


def _build_model(meta: dict, device) -> nn.Module:
    import importlib
    if meta.get("model_config") is None:
        raise CheckpointError("checkpoint has no model config: pass the model skeleton to load(path, model=...)")
    module = importlib.import_module(meta["model_module"])
    cls = getattr(module, meta["model_class"])
    cfg = {k: v for k, v in meta["model_config"].items() if not k.startswith("_")}
    with torch.device(device):
        return cls.from_config(cfg) if hasattr(cls, "from_config") else cls(**cfg)


def _check_same_model(model: nn.Module, meta: dict, path) -> None:
    if type(model).__name__ != meta["model_class"]:
        raise CheckpointError(f"checkpoint {path} is for {meta['model_class']}, not {type(model).__name__}")
    mine, theirs = _model_config(model), meta.get("model_config")
    if mine is not None and theirs is not None:
        diff = sorted(k for k in set(mine) | set(theirs) if not k.startswith("_") and mine.get(k) != theirs.get(k))
        if diff:
            raise CheckpointError(f"checkpoint {path} is for a {meta['model_class']} with another config "
                                  f"(differs in: {', '.join(diff[:5])})")


def load(path, model: Optional[nn.Module] = None, device="cpu") -> nn.Module:
    """Load a quantized checkpoint; builds the diffusers model from the header if ``model`` is None."""
    path = Path(path)
    meta = read_metadata(path)
    tensors = _read_tensors(path, meta)
    if model is None:
        model = _build_model(meta, device)
    _check_same_model(model, meta, path)
    refuse_hooked_layers(model, meta["layers"])
    _check_zero_points(tensors, meta, path)                 # before the model is touched
    _check_master_tensors(tensors, meta, path)
    state = RuntimeState()
    for name, lm in meta["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"checkpoint {path} names layer {name}, which this model lacks") from None
        q = quant_linear_from_meta(lm, device)
        q.state, q.layer_name = state, name
        set_submodule(model, name, q)
        del old
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    derived = {f"{n}.{b}" for n in _dynamic_layers(meta) for b in _DERIVED}
    missing = [k for k in missing if k not in derived]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for name in _dynamic_layers(meta):                     # the weight at s = 1, from the loaded master
        q = model.get_submodule(name)
        q.set_weight_params(q.smoothed_weight_params())
    model.to(device)
    attach_runtime(model, state, config_from_dict(meta["config"]))   # state, config, step hook
    qattn.apply_config(model, getattr(model, CONFIG_ATTR))   # reinstall 8-bit attention from the saved config
    return model
