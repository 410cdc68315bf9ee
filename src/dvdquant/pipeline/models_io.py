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


def load_generation_model(spec: str, device="cpu"):
    """An EmbeddedModel for ``"embedded"`` or for a quantized checkpoint of the embedded model."""
    from ..models.embedded import load_embedded
    if spec == EMBEDDED:
        return load_embedded(device=device)
    path = Path(spec)
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
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise DVDQuantError(f"--model {spec!r} is neither 'embedded' nor a diffusers model directory "
                            "(no config.json)")
    class_name = json.loads(cfg_file.read_text()).get("_class_name")
    import diffusers
    cls = getattr(diffusers, class_name or "", None)
    if cls is None:
        raise DVDQuantError(f"{cfg_file} names class {class_name!r}, which diffusers does not provide")
    log.info("loading %s from %s", class_name, path)
    return cls.from_pretrained(str(path)).to(device), str(path)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor in the module's state dict (parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())
