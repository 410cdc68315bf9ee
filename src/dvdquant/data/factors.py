"""Factors of variation, captions and the tokenizer of the procedural video dataset.

The embedded model is conditioned on short captions built from four discrete factors
(shape, colour, motion, background). Keeping the grammar fixed and tiny means every
caption maps back to its factors exactly, which is what lets a classifier measure whether
a generated clip follows its prompt. Only the standard library and torch are used.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "white")
# caption phrase of each motion (the factor's name is the first entry of MOTIONS)
MOTIONS: tuple[str, ...] = (
    "left", "right", "up", "down", "growing", "shrinking", "bouncing", "still",
)
MOTION_PHRASES: dict[str, str] = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "growing": "growing",
    "shrinking": "shrinking",
    "bouncing": "bouncing",
    "still": "staying still",
}
BACKGROUNDS: tuple[str, ...] = ("dark", "striped", "checkered", "gradient")

FACTORS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "motion": MOTIONS,
    "background": BACKGROUNDS,
}
FACTOR_NAMES: tuple[str, ...] = tuple(FACTORS)

PAD = "<pad>"
MAX_TOKENS = 12  # longest caption is 10 words ("a ... staying still on a ... background")

_GRAMMAR_WORDS = ("a", "on", "background", "moving", "staying")
VOCAB: list[str] = [PAD] + sorted(
    set(_GRAMMAR_WORDS) | set(SHAPES) | set(COLOURS) | set(BACKGROUNDS)
    | {w for phrase in MOTION_PHRASES.values() for w in phrase.split()}
)
PAD_ID = 0


@dataclass(frozen=True)
class Factors:
    """One combination of factor values, by name."""

    shape: str
    colour: str
    motion: str
    background: str

    def indices(self) -> dict[str, int]:
        return {name: FACTORS[name].index(getattr(self, name)) for name in FACTOR_NAMES}

    @classmethod
    def from_indices(cls, shape: int, colour: int, motion: int, background: int) -> "Factors":
        return cls(SHAPES[shape], COLOURS[colour], MOTIONS[motion], BACKGROUNDS[background])


def make_caption(f: Factors) -> str:
    """``Factors`` -> "a red square moving left on a striped background"."""
    return f"a {f.colour} {f.shape} {MOTION_PHRASES[f.motion]} on a {f.background} background"


def parse_caption(caption: str) -> Factors:
    """Inverse of :func:`make_caption`; raises ``ValueError`` naming what does not parse."""
    words = caption.lower().split()
    tokenize([caption])  # unknown words -> ValueError listing the vocabulary
    if len(words) < 7 or words[0] != "a" or words[-4:-2] != ["on", "a"] or words[-1] != "background":
        raise ValueError(
            f"caption {caption!r} does not follow 'a <colour> <shape> <motion> on a <background> background'"
        )
    colour, shape, bg = words[1], words[2], words[-2]
    motion_phrase = " ".join(words[3:-4])
    by_phrase = {p: m for m, p in MOTION_PHRASES.items()}
    for value, allowed, name in ((colour, COLOURS, "colour"), (shape, SHAPES, "shape"),
                                 (bg, BACKGROUNDS, "background")):
        if value not in allowed:
            raise ValueError(f"caption {caption!r}: {value!r} is not a {name} (one of {list(allowed)})")
    if motion_phrase not in by_phrase:
        raise ValueError(
            f"caption {caption!r}: {motion_phrase!r} is not a motion (one of {list(by_phrase)})"
        )
    return Factors(shape, colour, by_phrase[motion_phrase], bg)


def tokenize(captions: list[str] | str, max_len: int = MAX_TOKENS) -> torch.Tensor:
    """Captions -> token ids (B, max_len) int64, right-padded with ``PAD_ID``.

    The empty caption "" maps to all padding (the unconditional input of CFG).
    Raises ``ValueError`` naming an unknown word and listing the vocabulary.
    """
    if isinstance(captions, str):
        captions = [captions]
    index = {w: i for i, w in enumerate(VOCAB)}
    out = torch.full((len(captions), max_len), PAD_ID, dtype=torch.long)
    for row, caption in enumerate(captions):
        words = caption.lower().split()
        if len(words) > max_len:
            raise ValueError(f"caption {caption!r} has {len(words)} words, more than {max_len}")
        for col, word in enumerate(words):
            if word not in index or word == PAD:
                raise ValueError(
                    f"unknown word {word!r} in caption {caption!r}; vocabulary: {' '.join(VOCAB[1:])}"
                )
            out[row, col] = index[word]
    return out


class Tokenizer:
    """Callable wrapper around :func:`tokenize` (what pipelines hold as ``tokenizer``)."""

    vocab = VOCAB
    pad_id = PAD_ID
    max_len = MAX_TOKENS

    def __call__(self, captions: list[str] | str) -> torch.Tensor:
        return tokenize(captions, self.max_len)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [" ".join(VOCAB[i] for i in row.tolist() if i != PAD_ID) for row in ids]


def combination_index(labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Index (N,) of each clip's combination in :func:`all_combinations` order."""
    idx = torch.zeros_like(labels[FACTOR_NAMES[0]])
    for name in FACTOR_NAMES:
        idx = idx * len(FACTORS[name]) + labels[name]
    return idx


def caption_token_table() -> torch.Tensor:
    """Token ids (num_combinations, MAX_TOKENS) of every caption, in combination order."""
    return tokenize([make_caption(f) for f in all_combinations()])


def all_combinations() -> list[Factors]:
    """Every factor combination, in a fixed order (shape-major)."""
    return [Factors(*c) for c in itertools.product(SHAPES, COLOURS, MOTIONS, BACKGROUNDS)]


def sample_combinations(n: int, seed: int = 0) -> list[Factors]:
    """``n`` combinations that cover each factor value as evenly as possible.

    Each factor cycles through its values (shuffled per factor by ``seed``), so for
    n >= 8 every shape, colour, motion and background occurs.
    """
    rng = random.Random(seed)
    columns = []
    for name in FACTOR_NAMES:
        values = list(FACTORS[name])
        col: list[str] = []
        while len(col) < n:
            rng.shuffle(values)
            col.extend(values)
        columns.append(col[:n])
    return [Factors(*vals) for vals in zip(*columns)]
