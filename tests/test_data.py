"""Procedural dataset: determinism, labels, caption <-> factors, tokenizer errors."""

import pytest
import torch

from dvdquant.data import (COLOURS, FACTOR_NAMES, MOTIONS, VOCAB, Factors, all_combinations,
                           caption_token_table, combination_index, generate_clips, make_caption,
                           parse_caption, sample_combinations, tokenize)
from dvdquant.data.generator import COLOUR_RGB


def test_deterministic_and_seed_dependent():
    a, b = generate_clips(32, seed=5), generate_clips(32, seed=5)
    assert torch.equal(a.videos, b.videos) and a.captions == b.captions
    assert not torch.equal(a.videos, generate_clips(32, seed=6).videos)
    assert a.videos.shape == (32, 16, 32, 32, 3) and a.videos.dtype == torch.float32
    assert a.videos.min() >= 0 and a.videos.max() <= 1


def test_object_pixels_have_the_labelled_colour():
    batch = generate_clips(64, seed=1)
    for i in range(len(batch)):
        inside = batch.masks[i] > 0.99  # (F, H, W) fully covered pixels
        assert inside.sum() > 16
        mean_rgb = batch.videos[i][inside].mean(0)
        dists = (COLOUR_RGB - mean_rgb).norm(dim=1)
        assert int(dists.argmin()) == int(batch.labels["colour"][i]), batch.captions[i]


def test_motion_labels_match_object_trajectory():
    wanted = [Factors("circle", "red", m, "dark") for m in MOTIONS]
    batch = generate_clips(len(wanted), seed=2, factors=wanted)
    xs = torch.arange(32) + 0.5
    for i, f in enumerate(wanted):
        m = batch.masks[i]  # (F, H, W)
        area = m.sum((1, 2))
        cx = (m * xs).sum((1, 2)) / area
        cy = (m * xs[:, None]).sum((1, 2)) / area
        dx, dy, da = cx[-1] - cx[0], cy[-1] - cy[0], area[-1] - area[0]
        checks = {"left": dx < -8, "right": dx > 8, "up": dy < -8, "down": dy > 8, "growing": da > 50,
                  "shrinking": da < -50, "bouncing": (cy.max() - cy.min()) > 6 and abs(dy) < 2,
                  "still": abs(dx) < 1e-4 and abs(dy) < 1e-4 and abs(da) < 1e-3}
        assert checks[f.motion], f.motion


def test_requested_factors_are_rendered_and_captioned():
    combos = sample_combinations(40, seed=0)
    batch = generate_clips(40, seed=3, factors=combos)
    assert [batch.factors(i) for i in range(40)] == combos
    assert batch.captions == [make_caption(f) for f in combos]
    for name in FACTOR_NAMES:  # every value of every factor is covered
        assert {getattr(f, name) for f in combos} == set(getattr(__import__("dvdquant.data", fromlist=["x"]),
                                                                 {"shape": "SHAPES", "colour": "COLOURS",
                                                                  "motion": "MOTIONS",
                                                                  "background": "BACKGROUNDS"}[name]))


def test_caption_round_trip_for_every_combination():
    combos = all_combinations()
    assert len(combos) == 4 * 6 * 8 * 4
    for f in combos:
        assert parse_caption(make_caption(f)) == f
    assert parse_caption("A Red Square moving left on a striped background") == Factors(
        "square", "red", "left", "striped")


def test_token_table_matches_tokenizer():
    batch = generate_clips(50, seed=4)
    ids = caption_token_table()[combination_index(batch.labels)]
    assert torch.equal(ids, tokenize(batch.captions))
    assert torch.equal(tokenize(""), torch.zeros(1, 12, dtype=torch.long))


def test_unknown_word_error_names_word_and_lists_vocabulary():
    with pytest.raises(ValueError) as err:
        tokenize(["a red dog moving left on a dark background"])
    msg = str(err.value)
    assert "'dog'" in msg
    assert all(w in msg for w in VOCAB[1:])
    with pytest.raises(ValueError, match="not a colour"):
        parse_caption("a square red moving left on a dark background")
    with pytest.raises(ValueError, match="does not follow"):
        parse_caption("red square")


def test_colours_are_distinct():
    d = torch.cdist(COLOUR_RGB, COLOUR_RGB) + torch.eye(len(COLOURS))
    assert d.min() > 0.3
