"""Resolve a ``--model`` argument: the embedded model, a dvdquant checkpoint, or a diffusers directory."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .. import serialization
from ..errors import DVDQuantError

log = logging.getLogger(__name__)
EMBEDDED = "embedded"
CHECKPOINT_NAME = "quantized.safetensors"          # what ``dvdquant quantize --out DIR`` writes in DIR


def checkpoint_path(spec) -> Path:
    """A checkpoint file, or the folder ``quantize`` wrote (then its quantized.safetensors)."""
    path = Path(spec)
    if path.is_dir():
        if not (path / CHECKPOINT_NAME).is_file():
            raise DVDQuantError(f"--model {path} is a folder without {CHECKPOINT_NAME} (the file `dvdquant quantize "
                                "--out` writes); give the checkpoint file")
        return path / CHECKPOINT_NAME
    return path


def load_generation_model(spec: str, device="cpu"):
    """An EmbeddedModel for ``"embedded"`` or for a quantized checkpoint of the embedded model."""
    from ..models.embedded import load_embedded
    if spec == EMBEDDED:
        return load_embedded(device=device)
    path = checkpoint_path(spec)
    meta = serialization.read_metadata(path)
    if meta.get("extra", {}).get("base_model") != EMBEDDED:
        raise DVDQuantError(f"{path} is a checkpoint of {meta['model_class']}, not of the embedded model: "
                            "`generate` only drives the embedded model's pipeline")
    model = load_embedded(device=device)
    model.transformer = serialization.load(path, model=model.transformer, device=device)
    return model


def load_transformer(spec: str, device="cpu") -> tuple[torch.nn.Module, str]:
    """(transformer, base name) for ``quantize``: the embedded DiT or a diffusers model directory."""
    if spec == EMBEDDED:
        from ..models.embedded import load_embedded
        return load_embedded(device=device).transformer, EMBEDDED
    path = Path(spec)
    cls, _ = diffusers_model_class(spec)
    log.info("loading %s from %s", cls.__name__, path)
    return _from_pretrained(cls, path).to(device), str(path)


def diffusers_model_class(spec: str) -> tuple[type, dict]:
    """(diffusers class, config dict) of the model directory ``spec``, from its config.json."""
    cfg_file = Path(spec) / "config.json"
    if not cfg_file.is_file():
        raise DVDQuantError(f"--model {spec!r} is neither 'embedded' nor a diffusers model directory "
                            "(no config.json)")
    cfg = json.loads(cfg_file.read_text())
    import diffusers
    cls = getattr(diffusers, cfg.get("_class_name") or "", None)
    if cls is None:
        raise DVDQuantError(f"{cfg_file} names class {cfg.get('_class_name')!r}, which diffusers does not provide")
    return cls, cfg


def dtype_kwarg(dtype) -> dict:
    """``from_pretrained``'s dtype keyword: ``dtype`` from diffusers 0.36, ``torch_dtype`` before."""
    if dtype is None:
        return {}
    import diffusers.utils.deprecation_utils as dep
    return {"dtype" if hasattr(dep, "_resolve_dtype") else "torch_dtype": dtype}


def _from_pretrained(cls, path: Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``cls.from_pretrained`` where it works; without ``accelerate`` some classes (Wan: fp32-kept
    modules) refuse to load, so build from the config and load the safetensors (sharded or not).
    ``dtype``: load in this dtype (None: the file's)."""
    import importlib.util
    if importlib.util.find_spec("accelerate") is not None:
        return cls.from_pretrained(str(path), **dtype_kwarg(dtype))
    from safetensors.torch import load_file
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["diffusion_pytorch_model.safetensors"]
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise DVDQuantError(f"{path} has no weights file {missing[0]} (only safetensors weights are supported)")
    log.info("accelerate is not installed: building %s from its config, then loading %d weight file(s)",
             cls.__name__, len(files))
    state = {}
    for f in files:
        state.update(load_file(str(path / f)))
    dtype = next(iter(state.values())).dtype if state else torch.float32
    model = cls.from_config(cls.load_config(str(path))).to(dtype)
    model.load_state_dict(state, strict=True)
    if dtype is not None and dtype != model.dtype:
        model = model.to(dtype)
    return model.eval()


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor in the module's state dict (parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())
