"""Procedural video dataset: the training data of the embedded model and its classifier.

Imports only torch (and the standard library), so it can be used anywhere, CI included.
"""

from .factors import (BACKGROUNDS, COLOURS, FACTOR_NAMES, FACTORS, MAX_TOKENS, MOTION_PHRASES,
                      MOTIONS, PAD, PAD_ID, SHAPES, VOCAB, Factors, Tokenizer, all_combinations,
                      caption_token_table, combination_index,
                      make_caption, parse_caption, sample_combinations, tokenize)
from .generator import NUM_FRAMES, SIZE, ClipBatch, generate_clips

__all__ = [
    "BACKGROUNDS", "COLOURS", "FACTOR_NAMES", "FACTORS", "MAX_TOKENS", "MOTION_PHRASES", "MOTIONS",
    "PAD", "PAD_ID", "SHAPES", "VOCAB", "Factors", "Tokenizer", "all_combinations",
    "caption_token_table", "combination_index", "make_caption",
    "parse_caption", "sample_combinations", "tokenize", "NUM_FRAMES", "SIZE", "ClipBatch",
    "generate_clips",
]
