"""Procedural video clips: one coloured shape moving over a textured background.

This is the training distribution of the embedded video DiT and of its evaluator
classifier. Rendering is fully vectorised in torch (signed distance functions evaluated on
a (N, F, H, W) grid), so thousands of 16x32x32 clips render in well under a second, on the
CPU or directly on the GPU during training. All random draws come from a CPU
``torch.Generator`` seeded by the caller, so a clip depends only on (seed, index in batch,
requested factors), never on the device it is rendered on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .factors import (BACKGROUNDS, COLOURS, FACTOR_NAMES, MOTIONS, SHAPES, Factors,
                      make_caption)

NUM_FRAMES = 16
_CHUNK = 512  # clips rendered at once
SIZE = 32

# RGB of each colour, before a small per-clip brightness jitter
COLOUR_RGB = torch.tensor([
    [0.95, 0.15, 0.15],  # red
    [0.15, 0.90, 0.20],  # green
    [0.20, 0.35, 1.00],  # blue
    [0.95, 0.90, 0.15],  # yellow
    [0.95, 0.20, 0.90],  # magenta
    [0.95, 0.95, 0.95],  # white
])
assert COLOUR_RGB.shape[0] == len(COLOURS)


@dataclass
class ClipBatch:
    """A batch of clips with everything that produced them."""

    videos: torch.Tensor  # (N, F, H, W, 3) float32 in [0, 1]
    masks: torch.Tensor  # (N, F, H, W) object coverage (alpha) in [0, 1]
    labels: dict[str, torch.Tensor]  # factor name -> (N,) int64 index into FACTORS[name]
    captions: list[str]

    def factors(self, i: int) -> Factors:
        return Factors.from_indices(*(int(self.labels[k][i]) for k in FACTOR_NAMES))

    def __len__(self) -> int:
        return self.videos.shape[0]


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _labels_from(factors, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Factor indices (N,) per factor: drawn uniformly, or taken from ``factors``."""
    sizes = {"shape": len(SHAPES), "colour": len(COLOURS), "motion": len(MOTIONS),
             "background": len(BACKGROUNDS)}
    drawn = {k: torch.randint(0, sizes[k], (n,), generator=g) for k in FACTOR_NAMES}
    if factors is None:
        return drawn
    if isinstance(factors, dict):
        return {k: torch.as_tensor(factors[k], dtype=torch.long).reshape(n) for k in FACTOR_NAMES}
    if len(factors) != n:
        raise ValueError(f"got {len(factors)} factor combinations for {n} clips")
    idx = [f.indices() for f in factors]
    return {k: torch.tensor([d[k] for d in idx], dtype=torch.long) for k in FACTOR_NAMES}


def _trajectories(motion: torch.Tensor, g: torch.Generator, frames: int, size: int):
    """Centre x, y and radius per frame, each (N, F), in pixels."""
    n = motion.shape[0]
    t = torch.linspace(0.0, 1.0, frames)[None]  # (1, F)
    s = size / 32.0
    r0 = _uniform(g, n, 4.5, 6.5)[:, None] * s
    lo, hi = _uniform(g, n, 8.0, 11.0)[:, None] * s, _uniform(g, n, 21.0, 24.0)[:, None] * s
    dist = _uniform(g, n, 12.0, 16.0)[:, None] * s
    cx0 = _uniform(g, n, 9.0, 23.0)[:, None] * s
    cy0 = _uniform(g, n, 9.0, 23.0)[:, None] * s
    r_small, r_big = _uniform(g, n, 2.5, 3.5)[:, None] * s, _uniform(g, n, 8.0, 9.5)[:, None] * s
    amp = _uniform(g, n, 8.0, 12.0)[:, None] * s
    floor = _uniform(g, n, 22.0, 25.0)[:, None] * s

    ones = torch.ones(n, frames)
    cx, cy, r = cx0 * ones, cy0 * ones, r0 * ones
    m = motion[:, None].expand(n, frames)
    start_hi, start_lo = hi + 2 * s, lo - 2 * s
    cx = torch.where(m == 0, start_hi - dist * t, cx)  # left
    cx = torch.where(m == 1, start_lo + dist * t, cx)  # right
    cy = torch.where(m == 2, start_hi - dist * t, cy)  # up (y grows downwards)
    cy = torch.where(m == 3, start_lo + dist * t, cy)  # down
    r = torch.where(m == 4, r_small + (r_big - r_small) * t, r)  # growing
    r = torch.where(m == 5, r_big - (r_big - r_small) * t, r)  # shrinking
    bounce = floor - amp * torch.abs(torch.sin(2.0 * math.pi * t))  # two hops
    cy = torch.where(m == 6, bounce, cy)  # bouncing; 7 = still
    return cx, cy, r


def _shape_sdf(shape: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (in units of the radius) of one shape; u, v, out: (n, F, H, W)."""
    au, av = u.abs(), v.abs()
    if shape == 0:  # circle
        return torch.sqrt(u * u + v * v) - 1.0
    if shape == 1:  # square
        return torch.maximum(au, av) - 0.85
    if shape == 2:  # equilateral triangle, apex up, inradius 0.6
        return torch.maximum(v - 0.6, 0.866 * au - 0.5 * v - 0.6)
    w = 0.38  # cross: half-width of the arms
    return torch.minimum(torch.maximum(au - w, av - 1.0), torch.maximum(au - 1.0, av - w))


def _render_alpha(shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor,
                  size: int) -> torch.Tensor:
    """Object coverage (N, F, H, W) from per-frame centre/radius (N, F); one pass per shape."""
    n, frames = cx.shape
    coords = torch.arange(size, device=cx.device, dtype=torch.float32) + 0.5
    alpha = torch.empty(n, frames, size, size, device=cx.device)
    for k in range(4):
        idx = (shape == k).nonzero().flatten()
        if idx.numel() == 0:
            continue
        rr = r[idx][:, :, None, None]  # (n, F, 1, 1)
        u = (coords[None, None, None, :] - cx[idx][:, :, None, None]) / rr  # (n, F, 1, W)
        v = (coords[None, None, :, None] - cy[idx][:, :, None, None]) / rr  # (n, F, H, 1)
        u, v = torch.broadcast_tensors(u, v)  # (n, F, H, W)
        dist = _shape_sdf(k, u, v) * rr  # in pixels
        alpha[idx] = (0.5 - dist).clamp_(0.0, 1.0)  # 1-pixel anti-aliased edge
    return alpha


def _backgrounds(bg: torch.Tensor, g: torch.Generator, frames: int, size: int, device) -> torch.Tensor:
    """Static textures (N, H, W, 3), dim (< 0.45) so every object colour stands out."""
    n = bg.shape[0]
    lo = _uniform(g, n, 0.04, 0.12)[:, None, None].to(device)
    hi = _uniform(g, n, 0.28, 0.42)[:, None, None].to(device)
    period = _uniform(g, n, 6.0, 10.0)[:, None, None].to(device) * size / 32
    phase = _uniform(g, n, 0.0, 1.0)[:, None, None].to(device)
    angle = (torch.randint(0, 4, (n,), generator=g).float() * math.pi / 4)[:, None, None].to(device)
    tint = _uniform(g, 3 * n, 0.75, 1.0).reshape(n, 1, 1, 3).to(device)
    coords = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (H, W)
    along = xx * torch.cos(angle) + yy * torch.sin(angle)  # (N, H, W)
    stripes = torch.where(torch.frac(along / period + phase) < 0.5, hi, lo)
    cell = period * 0.6
    checker = torch.where(((torch.floor(xx / cell + phase) + torch.floor(yy / cell)) % 2) < 1, hi, lo)
    ramp = (along - along.amin(dim=(1, 2), keepdim=True)) / (
        along.amax(dim=(1, 2), keepdim=True) - along.amin(dim=(1, 2), keepdim=True) + 1e-6)
    gradient = lo + (hi - lo) * ramp
    b = bg.to(device)[:, None, None]
    level = torch.where(b == 0, lo.expand_as(stripes),
                        torch.where(b == 1, stripes, torch.where(b == 2, checker, gradient)))
    return level[..., None] * tint  # (N, H, W, 3)


def generate_clips(n: int, seed: int = 0, *, factors=None, device="cpu",
                   num_frames: int = NUM_FRAMES, size: int = SIZE, with_captions: bool = True) -> ClipBatch:
    """Render ``n`` clips deterministically from ``seed``.

    ``factors``: None (drawn uniformly), a list of :class:`Factors`, or a dict of index
    tensors per factor name. Returns a :class:`ClipBatch` with videos (N, F, H, W, 3);
    ``with_captions=False`` skips building the caption strings (training loops).
    """
    g = torch.Generator().manual_seed(int(seed))
    labels = _labels_from(factors, n, g)
    cx, cy, r = (a.to(device) for a in _trajectories(labels["motion"], g, num_frames, size))
    jitter = _uniform(g, n, 0.85, 1.0)[:, None].to(device)
    rgb = COLOUR_RGB.to(device)[labels["colour"].to(device)] * jitter  # (N, 3)
    background = _backgrounds(labels["background"], g, num_frames, size, device)

    shape = labels["shape"].to(device)
    videos = torch.empty(n, num_frames, size, size, 3, device=device)
    alpha = torch.empty(n, num_frames, size, size, device=device)
    for lo in range(0, n, _CHUNK):  # chunks keep the working set in cache on the CPU
        sl = slice(lo, lo + _CHUNK)
        a = _render_alpha(shape[sl], cx[sl], cy[sl], r[sl], size)  # (n, F, H, W)
        alpha[sl] = a
        a = a[..., None]
        videos[sl] = torch.lerp(background[sl, None], rgb[sl, None, None, None, :], a).clamp_(0, 1)
    captions = [make_caption(Factors.from_indices(*(int(labels[k][i]) for k in FACTOR_NAMES)))
                for i in range(n)] if with_captions else []
    return ClipBatch(videos, alpha, labels, captions)
