"""Decoding in worker processes gives exactly what decoding in the main process gives, in the same order."""

from __future__ import annotations

import pytest
import torch

from stablediff.data.buckets import resolve_buckets
from stablediff.data.crop_policy import CropPolicy
from stablediff.data.training_set import load_captioned_images

from .corpus import build_mixed_aspect_folder


def load(spec, run_dir, workers, **options):
    return load_captioned_images(spec, 32, run_dir, 1.0, num_workers=workers, **options)


def assert_same(a, b):
    assert torch.equal(a.images, b.images) and torch.equal(a.held_out, b.held_out)
    assert a.captions == b.captions and a.keys == b.keys and a.prepared.bucket_ids == b.prepared.bucket_ids
    for crops_a, crops_b in zip(a.prepared.crops, b.prepared.crops, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(crops_a, crops_b, strict=True))


@pytest.mark.parametrize("fmt", ["folder", "tar"])
def test_workers_yield_the_same_images_captions_and_quarantine(corpus_specs, tmp_path, fmt):
    # The corpus holds every kind of reject, including a duplicate of an accepted image.
    inline = load(corpus_specs[fmt], tmp_path / "inline", 0)
    pooled = load(corpus_specs[fmt], tmp_path / "pooled", 2)
    assert_same(inline, pooled)
    quarantine = (tmp_path / "inline" / "quarantine.jsonl").read_text()
    assert "duplicate" in quarantine and "truncated" in quarantine
    assert (tmp_path / "pooled" / "quarantine.jsonl").read_text() == quarantine


def test_workers_frame_buckets_and_random_crops_like_the_main_process(tmp_path):
    spec = build_mixed_aspect_folder(tmp_path / "data")
    crop_policy = CropPolicy(tuple(resolve_buckets("auto", 32, 16)), crop="random", variants=2, seed=5)
    assert_same(load(spec, tmp_path / "a", 0, crop_policy=crop_policy),
                load(spec, tmp_path / "b", 2, crop_policy=crop_policy))


def test_a_limit_stops_workers_where_the_main_process_stops(corpus_specs, tmp_path):
    inline = load(corpus_specs["folder"], tmp_path / "inline", 0, limit=3)
    pooled = load(corpus_specs["folder"], tmp_path / "pooled", 2, limit=3)
    assert len(inline.captions) == 3
    assert_same(inline, pooled)
    assert ((tmp_path / "pooled" / "quarantine.jsonl").read_text()
            == (tmp_path / "inline" / "quarantine.jsonl").read_text())


def test_a_negative_worker_count_is_refused(corpus_specs, tmp_path):
    with pytest.raises(ValueError, match="num_workers"):
        load(corpus_specs["folder"], tmp_path, -1)
