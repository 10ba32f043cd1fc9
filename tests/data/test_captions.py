"""Tag shuffling: seeded, keeps the head tags, leaves the rest intact."""

from __future__ import annotations

import random

import numpy as np

from stablediff.data.captions import shuffle_tags, shuffled_variants


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


def test_shuffled_variants_keep_the_head_and_are_reproducible():
    caption = "sks dog, sitting, grass, sunny, photo"
    variants = shuffled_variants(caption, 6, seed=1, sample_index=3, keep_tokens=1)
    assert variants[0] == caption and len(variants) > 1
    assert all(v.startswith("sks dog, ") for v in variants)
    assert all(sorted(v.split(", ")) == sorted(caption.split(", ")) for v in variants)
    assert variants == shuffled_variants(caption, 6, seed=1, sample_index=3, keep_tokens=1)
    assert shuffled_variants("one tag", 4, seed=0, sample_index=0) == ["one tag"]
