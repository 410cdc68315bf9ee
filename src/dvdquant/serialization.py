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
(N, K/R) fp32; DVD-Quant ``mean_channel="exact"``). A checkpoint is written at the lowest version
that holds it, so older readers still load what they can and refuse the rest with one line; a layer
entry without ``mean_channel`` is ``"quantized"`` (no mean term).
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
FORMAT_VERSION = 3                 # written when a layer has an exact mean term; 2 when one is dense-packed; else 1
READ_VERSIONS = (1, 2, 3)
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
    return d


def quant_linear_from_meta(meta: dict, device) -> QuantLinear:
    """An empty QuantLinear (tensors to be loaded) with the settings of :func:`layer_meta`'s entry."""
    mean = meta.get("mean_channel", "quantized")
    if mean not in ("quantized", "exact") or (mean == "exact" and not meta["rotation_block"]):
        raise CheckpointError(f"checkpoint layer entry has mean_channel={mean!r} with rotation_block="
                              f"{meta['rotation_block']!r}; expected 'quantized', or 'exact' on a rotated layer")
    return QuantLinear(meta["in_features"], meta["out_features"], w_bits=meta["w_bits"],
                       group_size=meta["group_size"], a_bits=meta["a_bits"], a8_format=meta["a8_format"],
                       rotation_block=meta["rotation_block"], auto_scale=meta["auto_scale"],
                       scale_block=meta["scale_block"], has_bias=meta["has_bias"],
                       smooth_steps=meta["smooth_steps"], balance_steps=meta["balance_steps"],
                       bias_dtype=getattr(torch, meta["bias_dtype"]),
                       exact_mean=mean == "exact", device=device)


def _dense_bits(m: QuantLinear) -> Optional[int]:
    """The width at which ``m``'s codes are stored densely, or None (int4-packed or 8-bit: as in memory)."""
    return None if m.packed or m.w_bits >= 8 else int(m.w_bits)


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
    dynamic = [n for n, m in quantized_layers(model) if getattr(m, "dyn_alpha", None) is not None]
    if dynamic:
        raise CheckpointError(f"saving DVD-Quant smoothing='dynamic' layers is not supported yet "
                              f"({len(dynamic)} layers, e.g. {dynamic[0]}): their master weights are not in the format")
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    layers = {n: dict(layer_meta(m), **({"packed_bits": _dense_bits(m)} if _dense_bits(m) else {}))
              for n, m in quantized_layers(model)}
    _pack_dense(tensors, layers)
    dense = any("packed_bits" in lm for lm in layers.values())
    exact_mean = any("mean_channel" in lm for lm in layers.values())
    meta = {
        "format_version": 3 if exact_mean else 2 if dense else 1, "library_version": __version__,
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
    _check_zero_points(tensors, meta, path)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    model.to(device)
    attach_runtime(model, state, config_from_dict(meta["config"]))   # state, config, step hook
    qattn.apply_config(model, getattr(model, CONFIG_ATTR))   # reinstall 8-bit attention from the saved config
    return model
