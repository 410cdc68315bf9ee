"""Sampling arguments checked before any work: captions that say something, at least one step."""
from __future__ import annotations

from typing import Sequence

from ..errors import DVDQuantError


def check_prompts(prompts: Sequence[str] | str) -> list[str]:
    """The captions as a list; an empty list or an empty/whitespace caption is refused."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise DVDQuantError("no prompt given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise DVDQuantError(f"prompt {i + 1} is empty: give a caption, e.g. "
                                "'a red circle moving left on a dark background'")
    return prompts


def check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DVDQuantError(f"steps must be an integer ≥ 1, got {steps!r}")
    return steps
