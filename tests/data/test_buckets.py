"""Aspect-ratio buckets: the kohya-style list, nearest-ratio choice, deterministic batches."""

from __future__ import annotations

import pytest

from stablediff.data.buckets import bucket_batches, make_buckets, nearest_bucket


def test_default_buckets_are_multiples_of_64_within_the_area():
    buckets = make_buckets((512, 512), min_side=256, max_side=1024)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(w * h <= 512 * 512 for w, h in buckets)
    assert all((h, w) in buckets for w, h in buckets)  # every shape also transposed
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)


def test_bucket_sides_must_be_multiples_of_the_step():
    with pytest.raises(ValueError, match="multiples of 64"):
        make_buckets(min_side=250)


def test_nearest_bucket_matches_aspect_ratio():
    buckets = make_buckets((512, 512))
    assert buckets[nearest_bucket(1000, 1000, buckets)] == (512, 512)
    assert buckets[nearest_bucket(1920, 1080, buckets)] == (640, 384)  # 16:9 -> 5:3
    assert buckets[nearest_bucket(1080, 1920, buckets)] == (384, 640)
    assert buckets[nearest_bucket(10, 1000, buckets)] == (256, 1024)  # extreme -> narrowest


def test_batches_hold_one_bucket_and_cover_every_index_once():
    sizes = [(512, 512), (1920, 1080), (1080, 1920), (800, 800), (1280, 720)] * 7
    buckets = make_buckets()
    ids = [nearest_bucket(width, height, buckets) for width, height in sizes]
    batches = bucket_batches(ids, batch_size=4, seed=3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(sizes)))
    assert all(len({ids[i] for i in batch}) == 1 for batch in batches)
    assert all(1 <= len(batch) <= 4 for batch in batches)


def test_batches_are_a_pure_function_of_seed_and_epoch():
    ids = [i % 3 for i in range(50)]
    assert bucket_batches(ids, 4, seed=1, epoch=2) == bucket_batches(ids, 4, seed=1, epoch=2)
    assert bucket_batches(ids, 4, seed=1, epoch=2) != bucket_batches(ids, 4, seed=1, epoch=3)
    assert bucket_batches(ids, 4, seed=1) != bucket_batches(ids, 4, seed=2)


def test_drop_last_leaves_only_full_batches():
    ids = [0] * 10 + [1] * 7
    batches = bucket_batches(ids, 4, seed=0, drop_last=True)
    assert all(len(batch) == 4 for batch in batches) and len(batches) == 3
