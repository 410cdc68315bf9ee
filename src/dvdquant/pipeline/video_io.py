"""Writing generated clips to disk: MP4/GIF per clip and PNG frame grids to compare models.

Clips are (F, H, W, 3) or (B, F, H, W, 3) float tensors in [0, 1]; the embedded model's
32x32 frames are upscaled with nearest-neighbour so that they are visible.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..fileio import atomic_path

log = logging.getLogger(__name__)
VIDEO_SUFFIXES = (".mp4", ".gif")


def _to_uint8(videos: torch.Tensor, scale: int) -> np.ndarray:
    """(F, H, W, 3) or (B, F, H, W, 3) -> (F, H*s, W*s or B*W*s, 3) uint8; a batch is tiled sideways."""
    v = torch.as_tensor(videos).detach().float().cpu().clamp(0, 1)
    if v.ndim == 5:
        v = torch.cat(list(v), dim=2)  # (F, H, B*W, 3)
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"expected videos of shape (F, H, W, 3) or (B, F, H, W, 3), got {tuple(v.shape)}")
    v = v.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return (v.numpy() * 255 + 0.5).astype(np.uint8)


def save_video(videos: torch.Tensor, path: str | Path, *, fps: int = 8, scale: int = 4) -> Path:
    """Write an MP4 (imageio-ffmpeg) or a GIF, chosen by the file extension, atomically."""
    import imageio.v2 as imageio

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"unsupported video extension {suffix!r} for {path}: use .mp4 or .gif")
    frames = _to_uint8(videos, scale)
    with atomic_path(path) as tmp:
        if suffix == ".gif":
            imageio.mimsave(tmp, list(frames), format="GIF", duration=1000 / fps, loop=0)
        else:
            h, w = frames.shape[1:3]
            pad = ((0, 0), (0, -h % 16), (0, -w % 16), (0, 0))  # codec macro blocks
            imageio.mimsave(tmp, list(np.pad(frames, pad)), format="FFMPEG", fps=fps, codec="libx264", quality=8,
                            macro_block_size=16)
    return path


def frame_grid_png(clips: Sequence[torch.Tensor] | torch.Tensor, path: str | Path, *,
                   row_labels: Sequence[str] | None = None, frames: Sequence[int] | None = None,
                   scale: int = 4, gap: int = 2) -> Path:
    """A PNG grid: one row per clip (e.g. per model), one column per selected frame.

    Each row is (F, H, W, 3), or (B, F, H, W, 3): then its B clips sit side by side in a tile.
    """
    from PIL import Image, ImageDraw

    clips = [torch.as_tensor(c).detach().float().cpu().clamp(0, 1) for c in clips]
    clips = [torch.cat(list(c), dim=2) if c.ndim == 5 else c for c in clips]  # (F, H, B*W, 3)
    n_frames = clips[0].shape[0]
    frames = list(frames) if frames is not None else list(range(0, n_frames, max(1, n_frames // 8)))
    h, w = clips[0].shape[1] * scale, clips[0].shape[2] * scale
    label_w = 0 if not row_labels else 8 + 6 * max(len(s) for s in row_labels)
    grid = Image.new("RGB", (label_w + len(frames) * (w + gap), len(clips) * (h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, clip in enumerate(clips):
        tiles = _to_uint8(clip[frames], scale)  # (len(frames), h, w, 3)
        for c, tile in enumerate(tiles):
            grid.paste(Image.fromarray(tile), (label_w + c * (w + gap), r * (h + gap)))
        if row_labels:
            draw.text((4, r * (h + gap) + h // 2 - 5), row_labels[r], fill=(0, 0, 0))
    path = Path(path)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path
