"""The embedded default model: a small Wan video DiT trained on the procedural dataset.

No real video DiT checkpoint can be downloaded where this project is developed and
tested, so it ships its own: a diffusers ``WanTransformer3DModel`` (the same class as Wan
2.1, so the same adapter and quantization code paths run) working directly in pixel
space on 16x32x32 RGB clips, conditioned by :class:`TinyTextEncoder` on captions such as
"a red square moving left on a striped background". Weights live in
``dvdquant/assets/embedded/`` and are SHA-256 checked on load. The training recipe is
``scripts/train_embedded.py`` (logic in :mod:`dvdquant.models.training`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from ..data import MAX_TOKENS, NUM_FRAMES, SIZE, VOCAB, Tokenizer
from ._assets import ASSETS_DIR, read_asset, write_asset
from .text_encoder import TinyTextEncoder

log = logging.getLogger(__name__)

EMBEDDED_DIR = ASSETS_DIR / "embedded"
WHAT = "embedded model"

# hidden 256 = 4 heads x 64 and FFN 1024: multiples of 128, as the quantized GEMMs need.
# Patch (2, 4, 4) over 16x32x32 -> 8x8x8 = 512 tokens per clip.
TRANSFORMER_CONFIG: dict = {
    "patch_size": [2, 4, 4],
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "in_channels": 3,
    "out_channels": 3,
    "text_dim": 128,
    "freq_dim": 256,
    "ffn_dim": 1024,
    "num_layers": 6,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 64,
}
TEXT_ENCODER_CONFIG: dict = {"vocab_size": len(VOCAB), "max_len": MAX_TOKENS, "dim": 128,
                             "layers": 1, "heads": 4}


@dataclass
class EmbeddedConfig:
    """Everything needed to rebuild and sample the model (stored as config.json)."""

    transformer: dict = field(default_factory=lambda: dict(TRANSFORMER_CONFIG))
    text_encoder: dict = field(default_factory=lambda: dict(TEXT_ENCODER_CONFIG))
    num_frames: int = NUM_FRAMES
    height: int = SIZE
    width: int = SIZE
    scheduler_shift: float = 3.0  # FlowMatchEulerDiscreteScheduler(shift=...) used in training
    vocab: list = field(default_factory=lambda: list(VOCAB))
    training: dict = field(default_factory=dict)  # recipe and results, informational

    @classmethod
    def from_dict(cls, d: dict) -> "EmbeddedConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class EmbeddedModel:
    """The DiT, its text encoder, its tokenizer and its config, ready for ``generate``."""

    transformer: WanTransformer3DModel
    text_encoder: TinyTextEncoder
    tokenizer: Tokenizer
    config: EmbeddedConfig

    def to(self, device=None, dtype=None) -> "EmbeddedModel":
        for module in (self.transformer, self.text_encoder):
            if device is not None:
                module.to(device)
            if dtype is not None and next(module.parameters()).dtype != dtype:
                module.to(dtype)
        return self


def build_embedded(config: EmbeddedConfig | None = None, seed: int = 0) -> EmbeddedModel:
    """A randomly initialised model (deterministic from ``seed``), e.g. to train it."""
    config = config or EmbeddedConfig()
    if config.vocab != list(VOCAB):
        raise ValueError("the embedded model's vocabulary differs from dvdquant.data.VOCAB")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**config.transformer)
        text_encoder = TinyTextEncoder(**config.text_encoder)
    return EmbeddedModel(transformer, text_encoder, Tokenizer(), config)


def save_embedded(model: EmbeddedModel, directory: Path = EMBEDDED_DIR,
                  dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """Write weights (as ``dtype``), config.json and sha256.json into ``directory``."""
    states = {
        "transformer": {k: v.to(dtype) for k, v in model.transformer.state_dict().items()},
        "text_encoder": {k: v.to(dtype) for k, v in model.text_encoder.state_dict().items()},
    }
    cfg = model.config.to_dict() | {"stored_dtype": str(dtype).removeprefix("torch.")}
    return write_asset(Path(directory), states, cfg, WHAT)


def load_embedded(device="cpu", dtype: torch.dtype = torch.float32,
                  directory: Path | str | None = None) -> EmbeddedModel:
    """Load the shipped model after checking the SHA-256 of its files.

    Raises :class:`dvdquant.errors.CheckpointError` ("embedded model file X is corrupted:
    sha256 mismatch ...") if a file was altered or truncated.
    """
    directory = Path(directory) if directory is not None else EMBEDDED_DIR
    states, cfg = read_asset(directory, ["transformer", "text_encoder"], WHAT)
    model = build_embedded(EmbeddedConfig.from_dict(cfg))
    model.transformer.load_state_dict({k: v.float() for k, v in states["transformer"].items()})
    model.text_encoder.load_state_dict({k: v.float() for k, v in states["text_encoder"].items()})
    model.transformer.eval().requires_grad_(False)
    model.text_encoder.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype)
