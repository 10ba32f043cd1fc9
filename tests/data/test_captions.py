"""Caption dropout and tag shuffling: seeded, keep the head tags, leave the rest intact."""

from __future__ import annotations

import random

import numpy as np
import pytest

from stablediff.data.captions import CaptionOptions, caption_dropout, shuffle_tags


def test_dropout_rate_matches_probability():
    rng = np.random.default_rng(0)
    dropped = sum(caption_dropout("a cat", 0.1, rng) == "" for _ in range(5000))
    assert 400 < dropped < 600


def test_dropout_zero_and_one_are_exact():
    rng = random.Random(0)
    assert all(caption_dropout("a cat", 0.0, rng) == "a cat" for _ in range(100))
    assert all(caption_dropout("a cat", 1.0, rng) == "" for _ in range(100))
    with pytest.raises(ValueError, match="probability"):
        caption_dropout("a cat", 1.5, rng)


def test_shuffle_keeps_the_first_tags_and_all_tags():
    caption = "sks dog, sitting, grass, sunny, photo, 4k"
    for seed in range(20):
        out = shuffle_tags(caption, np.random.default_rng(seed), keep_tokens=2).split(", ")
        assert out[:2] == ["sks dog", "sitting"]
        assert sorted(out) == sorted(caption.split(", "))


def test_shuffle_is_seeded_and_actually_shuffles():
    caption = ", ".join(f"tag{i}" for i in range(10))
    first = shuffle_tags(caption, np.random.default_rng(5))
    assert first == shuffle_tags(caption, np.random.default_rng(5))
    assert first != caption
    assert shuffle_tags(caption, random.Random(1)) == shuffle_tags(caption, random.Random(1))


def test_options_shuffle_then_drop():
    options = CaptionOptions(dropout=0.5, shuffle=True, keep_tokens=1)
    outs = [options.apply("a, b, c, d", np.random.default_rng(s)) for s in range(40)]
    assert "" in outs and any(o.startswith("a, ") for o in outs)
    assert all(o == "" or o.startswith("a, ") for o in outs)


def test_shuffled_variants_keep_the_head_and_are_reproducible():
    from stablediff.data.captions import shuffled_variants

    caption = "sks dog, sitting, grass, sunny, photo"
    variants = shuffled_variants(caption, 6, seed=1, sample_index=3, keep_tokens=1)
    assert variants[0] == caption and len(variants) > 1
    assert all(v.startswith("sks dog, ") for v in variants)
    assert all(sorted(v.split(", ")) == sorted(caption.split(", ")) for v in variants)
    assert variants == shuffled_variants(caption, 6, seed=1, sample_index=3, keep_tokens=1)
    assert shuffled_variants("one tag", 4, seed=0, sample_index=0) == ["one tag"]
