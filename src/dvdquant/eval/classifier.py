"""Evaluator classifier: reads shape, colour, motion and background off a 16x32x32 clip.

Prompt adherence of a (quantized) embedded model is measured by generating clips for
known captions and checking that this classifier, trained only on real generator clips,
recovers the captioned factors. Its penultimate features (256-d) also serve for a
Fréchet distance between generated and real clips. A small 3D-conv net keeps time
resolution to the end (motion needs order: bouncing vs up) and pools space.
Weights live in ``dvdquant/assets/classifier/``, SHA-256 checked on load.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import FACTOR_NAMES, FACTORS, Factors, generate_clips
from ..models._assets import ASSETS_DIR, read_asset, write_asset

log = logging.getLogger(__name__)

CLASSIFIER_DIR = ASSETS_DIR / "classifier"
WHAT = "classifier"


def _conv(cin: int, cout: int, stride) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class ClipClassifier(nn.Module):
    """Clips (B, F, H, W, 3) in [0, 1] -> logits per factor; ``features`` -> (B, feature_dim)."""

    def __init__(self, widths=(32, 64, 96, 128), feature_dim: int = 256, num_frames: int = 16):
        super().__init__()
        self.config = {"widths": list(widths), "feature_dim": feature_dim, "num_frames": num_frames}
        w = widths
        self.convs = nn.Sequential(_conv(3, w[0], 1), _conv(w[0], w[1], (1, 2, 2)),
                                   _conv(w[1], w[2], 2), _conv(w[2], w[3], 2))  # -> (B, w3, F/4, H/8, W/8)
        self.fc = nn.Sequential(nn.Linear(2 * w[3] * (num_frames // 4), feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(FACTORS[k])) for k in FACTOR_NAMES})

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim), e.g. for a Fréchet distance."""
        x = clips.to(self._device(), torch.float32).permute(0, 4, 1, 2, 3) * 2 - 1  # (B, 3, F, H, W)
        h = self.convs(x)  # (B, C, T, h, w)
        pooled = torch.cat([h.mean(dim=(3, 4)), h.amax(dim=(3, 4))], dim=1)  # (B, 2C, T)
        return self.fc(pooled.flatten(1))

    def forward(self, clips: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(clips)
        return {k: head(f) for k, head in self.heads.items()}

    @torch.no_grad()
    def classify(self, clips: torch.Tensor, chunk: int = 256) -> dict[str, torch.Tensor]:
        """Predicted index (B,) per factor name, on the CPU."""
        outs = [self(clips[i:i + chunk]) for i in range(0, clips.shape[0], chunk)]
        return {k: torch.cat([o[k].argmax(-1) for o in outs]).cpu() for k in FACTOR_NAMES}


@functools.lru_cache(maxsize=4)
def _cached(device: str) -> ClipClassifier:
    return load_classifier(device)


def load_classifier(device="cpu", directory: Path | str | None = None) -> ClipClassifier:
    """Load the shipped classifier after checking the SHA-256 of its files."""
    directory = Path(directory) if directory is not None else CLASSIFIER_DIR
    states, cfg = read_asset(directory, ["classifier"], WHAT)
    model = ClipClassifier(**cfg["model"])
    model.load_state_dict({k: v.float() for k, v in states["classifier"].items()})
    return model.eval().requires_grad_(False).to(device)


def classify(clips: torch.Tensor, classifier: ClipClassifier | None = None) -> dict[str, torch.Tensor]:
    """Predicted factor indices of clips (B, F, H, W, 3); loads the shipped classifier if needed."""
    return (classifier or _cached("cpu")).classify(clips)


def adherence_per_clip(clips: torch.Tensor, factors: list[Factors],
                       classifier: ClipClassifier | None = None) -> dict[str, torch.Tensor]:
    """Per clip (bool, (B,)): predicted factor equals the captioned one, per factor, plus 'all'."""
    pred = classify(clips, classifier)
    want = {k: torch.tensor([f.indices()[k] for f in factors]) for k in FACTOR_NAMES}
    hits = {k: pred[k] == want[k] for k in FACTOR_NAMES}
    hits["all"] = torch.stack(list(hits.values())).all(0)
    return hits


def adherence(clips: torch.Tensor, factors: list[Factors],
              classifier: ClipClassifier | None = None) -> dict[str, float]:
    """Fraction of clips whose predicted factor equals the captioned one, per factor, plus 'all'."""
    return {k: v.float().mean().item() for k, v in adherence_per_clip(clips, factors, classifier).items()}


def _augment(videos: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Noise and blur, so that slightly imperfect generated clips still classify."""
    n = videos.shape[0]
    dev = videos.device
    x = videos.permute(0, 4, 1, 2, 3)  # (N, 3, F, H, W)
    blurred = F.avg_pool3d(x, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    amount = torch.rand(n, generator=g, device=dev) * (torch.rand(n, generator=g, device=dev) < 0.5)
    x = torch.lerp(x, blurred, amount.view(-1, 1, 1, 1, 1))
    std = 0.08 * torch.rand(n, 1, 1, 1, 1, generator=g, device=dev)
    x = x + std * torch.randn(x.shape, generator=g, device=dev)
    return x.clamp(0, 1).permute(0, 2, 3, 4, 1)


def heldout_accuracy(model: ClipClassifier, n: int = 4096, seed: int = 987654) -> dict[str, float]:
    """Per-factor accuracy on freshly generated clips never seen in training."""
    batch = generate_clips(n, seed=seed, device=model._device(), with_captions=False)
    pred = model.classify(batch.videos)
    return {k: (pred[k] == batch.labels[k]).float().mean().item() for k in FACTOR_NAMES}


def train_classifier(out_dir: Path, device="cuda", steps: int = 1500, batch: int = 256, lr: float = 2e-3,
                     seed: int = 0, heldout: int = 4096) -> dict:
    """Train on fresh clips each step, save the hash-checked weights, return the results."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = ClipClassifier().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator(device).manual_seed(seed)
    t0, loss = time.time(), torch.zeros(())
    for step in tqdm(range(steps), mininterval=20, desc="train classifier"):
        data = generate_clips(batch, seed=(seed + 7) * 1_000_003 + step, device=device, with_captions=False)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(_augment(data.videos, g))
        loss = sum(F.cross_entropy(logits[k].float(), data.labels[k].to(device)) for k in FACTOR_NAMES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    wall = time.time() - t0
    model.eval()
    acc = heldout_accuracy(model, n=heldout)
    results = {"steps": steps, "batch": batch, "wall_time_s": round(wall, 1), "final_loss": loss.item(),
               "heldout_accuracy": acc, "heldout_clips": heldout,
               "params": sum(p.numel() for p in model.parameters())}
    write_asset(Path(out_dir), {"classifier": model.cpu().state_dict()},
                {"model": model.config, "results": results}, WHAT)
    (Path(out_dir) / "train_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"classifier: loss {results['final_loss']:.4f}, held-out accuracy {acc}")
    return results
