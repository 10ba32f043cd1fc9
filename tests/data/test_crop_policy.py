"""CropPolicy: each image to its nearest-aspect bucket, resized to cover it and cropped; random crops reproducible."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from stablediff.data.buckets import resolve_buckets
from stablediff.data.crop_policy import CropPolicy
from stablediff.data.training_set import load_captioned_images
from stablediff.data.validate import content_hash

from .corpus import build_mixed_aspect_folder, mixed_aspect_items

RESOLUTION, STEP = 32, 16  # the tiny VAE halves once: 8 x 2


def log_ratio(width: int, height: int) -> float:
    return math.log(width / height)


def test_auto_buckets_follow_kohya_within_the_area():
    buckets = resolve_buckets("auto", RESOLUTION, STEP)
    assert (RESOLUTION, RESOLUTION) in buckets and len(buckets) > 3
    assert all(w % STEP == 0 and h % STEP == 0 and w * h <= RESOLUTION**2 for w, h in buckets)
    assert all((h, w) in buckets for w, h in buckets)


def test_explicit_buckets_must_be_multiples_of_the_step():
    assert resolve_buckets([[48, 16], [16, 48]], RESOLUTION, STEP) == [(16, 48), (48, 16)]
    with pytest.raises(ValueError, match="multiple of 16"):
        resolve_buckets([[40, 16]], RESOLUTION, STEP)
    assert resolve_buckets(None, RESOLUTION, STEP) is None


def test_a_mixed_aspect_corpus_goes_to_the_nearest_buckets(tmp_path):
    spec = build_mixed_aspect_folder(tmp_path / "data")
    crop_policy = CropPolicy(tuple(resolve_buckets("auto", RESOLUTION, STEP)))
    data = load_captioned_images(spec, RESOLUTION, tmp_path / "run", 0.0, crop_policy=crop_policy)
    size_of = {content_hash(item.data): (int(item.key.split("_")[-1].split("x")[0]),
                                        int(item.key.split("x")[-1])) for item in mixed_aspect_items()}
    prepared = data.prepared
    assert len(set(prepared.bucket_ids)) >= 4  # landscape, portrait, square and extreme shapes
    for key, bucket, crops in zip(prepared.keys, prepared.bucket_ids, prepared.crops):
        width, height = size_of[key]
        distances = [abs(log_ratio(*size) - log_ratio(width, height)) for size in crop_policy.sizes]
        assert distances[bucket] == min(distances), (width, height, crop_policy.sizes[bucket])
        bucket_w, bucket_h = crop_policy.sizes[bucket]
        assert crops[0].shape == (3, bucket_h, bucket_w)
    assert data.images.shape[1:] == (3, RESOLUTION, RESOLUTION)  # the VAE stage still gets squares


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_random_crop_variants_are_deterministic_and_differ():
    crop_policy = CropPolicy(((32, 32),), crop="random", variants=4, seed=7)
    image = noise_image(64, 40)
    bucket, crops = crop_policy.frame(image, "sample-key")
    _, again = crop_policy.frame(image, "sample-key")
    assert all(np.array_equal(a, b) for a, b in zip(crops, again))
    assert all(crop.shape == (32, 32, 3) for crop in crops)
    distinct = {crop.tobytes() for crop in crops}
    assert len(distinct) == 4


def test_random_crops_depend_on_seed_and_sample_key():
    image = noise_image(64, 40)
    base = CropPolicy(((32, 32),), crop="random", variants=2, seed=7).frame(image, "a")[1]
    other_key = CropPolicy(((32, 32),), crop="random", variants=2, seed=7).frame(image, "b")[1]
    other_seed = CropPolicy(((32, 32),), crop="random", variants=2, seed=8).frame(image, "a")[1]
    assert not all(np.array_equal(x, y) for x, y in zip(base, other_key))
    assert not all(np.array_equal(x, y) for x, y in zip(base, other_seed))


def test_a_centre_crop_is_the_middle_of_the_covering_resize():
    image = Image.new("RGB", (96, 32), (0, 0, 255))
    image.paste((255, 0, 0), (32, 0, 64, 32))  # a red middle third
    _, (crop,) = CropPolicy(((32, 32),)).frame(image, "k")
    assert (crop[:, 4:28] == (255, 0, 0)).all()


def test_transform_ids_name_the_bucket_size_crop_and_variant():
    center = CropPolicy(((32, 32), (48, 16)))
    assert center.transform_id(0) == "cover-center-32"  # the pre-bucketing name: old caches stay valid
    assert center.transform_id(1) == "cover-center-48x16"
    random = CropPolicy(((48, 16),), crop="random", variants=2, seed=3)
    assert random.transform_id(0, 0) == "cover-random-48x16-seed3-v0"
    assert random.transform_id(0, 1) != random.transform_id(0, 0)


def test_more_than_one_centre_crop_variant_is_refused():
    with pytest.raises(ValueError, match="crop: random"):
        CropPolicy(((32, 32),), crop="center", variants=2)

