"""Fidelity and temporal metrics between generated clips (videos as (B, F, H, W, 3) in [0, 1]).

* PSNR in dB (capped at ``PSNR_CAP`` for identical clips, so tables stay finite);
* SSIM (Wang et al. 2004: 11×11 Gaussian window, σ = 1.5, per channel, averaged), per frame;
* relative L2 of the final sample;
* temporal: frame-to-frame consistency (mean absolute difference of consecutive frames) and
  flicker relative to a reference clip (how much the quantized clip's frame differences deviate
  from the reference's).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PSNR_CAP = 100.0


def psnr(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per-clip PSNR (B,) in dB for inputs in [0, 1]; capped at PSNR_CAP."""
    mse = (ref.float() - test.float()).pow(2).flatten(1).mean(1)
    out = 10 * torch.log10(1.0 / mse.clamp_min(1e-30))
    return out.clamp(max=PSNR_CAP)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g.view(1, 1, -1) * g.view(1, -1, 1)  # (1, size, size)


def ssim(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per-clip SSIM (B,), averaged over frames and channels (window shrinks for tiny frames)."""
    b, f, h, w, c = ref.shape
    size = min(11, h, w) if min(h, w) >= 3 else 1
    win = _gaussian_window(size).unsqueeze(0).repeat(c, 1, 1, 1)           # (C, 1, s, s)
    x = ref.float().reshape(b * f, h, w, c).permute(0, 3, 1, 2)             # (BF, C, H, W)
    y = test.float().reshape(b * f, h, w, c).permute(0, 3, 1, 2)
    conv = lambda t: F.conv2d(t, win, groups=c)                              # noqa: E731
    mx, my = conv(x), conv(y)
    sxx, syy, sxy = conv(x * x) - mx ** 2, conv(y * y) - my ** 2, conv(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.reshape(b, -1).mean(1)


def relative_l2(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖ref − test‖ / ‖ref‖ (B,)."""
    num = (ref.float() - test.float()).flatten(1).norm(dim=1)
    return num / ref.float().flatten(1).norm(dim=1).clamp_min(1e-12)


def frame_consistency(videos: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of consecutive frames (B,) — lower is smoother."""
    return (videos[:, 1:].float() - videos[:, :-1].float()).abs().flatten(1).mean(1)


def flicker_vs(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Mean |Δ_t(test) − Δ_t(ref)| over consecutive-frame differences (B,): 0 for identical motion."""
    d_ref = ref[:, 1:].float() - ref[:, :-1].float()
    d_test = test[:, 1:].float() - test[:, :-1].float()
    return (d_test - d_ref).abs().flatten(1).mean(1)


def finite_or_cap(x: float) -> float:
    return PSNR_CAP if math.isinf(x) else x
