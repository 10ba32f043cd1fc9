"""The digits feature network: deterministic, cached by fingerprint, and a feature space in which FD and KID
tell real digits from noise and from the wrong digits.

The cache tests train at 8x8 (a sixteenth of the work); the metric tests use the 32x32 of the demo.
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from stablediff.data.digits import load_digits
from stablediff.evaluation.digit_features import (FEATURE_DIM, default_cache_dir, feature_network, features,
                                                  fingerprint, real_features, train_feature_network)
from stablediff.evaluation.frechet import frechet_distance, kernel_inception_distance


def weights(net) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in net.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def cached8(tmp_path_factory):
    """A cache folder holding the 8x8 network, its weights, and how long training it took."""
    cache = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    net = feature_network(8, cache)
    return cache, weights(net), time.perf_counter() - start


@pytest.fixture(scope="module")
def digits32(tmp_path_factory):
    """Features at 32x32 of real train and held-out digits, uniform noise, and only the 1s."""
    cache = tmp_path_factory.mktemp("cache32")
    train, held = load_digits(32)
    noise = np.random.default_rng(0).integers(0, 256, size=held.images.shape, dtype=np.uint8)
    return {"cache": cache, "train": real_features("train", 32, cache), "held": real_features("held_out", 32, cache),
            "noise": features(noise, cache), "ones": features(train.images[train.labels == 1], cache)}


def cache_file(cache: Path) -> Path:
    (path,) = (cache / "digit-features").glob("digits8-*.safetensors")
    return path


def test_training_twice_gives_identical_weights_whatever_the_threads_and_leaves_the_rng_alone(cached8):
    _, cached, _ = cached8
    torch.set_num_threads(2)
    rng_before = torch.get_rng_state()
    retrained = train_feature_network(8)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert_same_weights(weights(retrained), cached)


def test_a_second_call_loads_the_cache_fast_and_identical(cached8):
    cache, cached, train_seconds = cached8
    start = time.perf_counter()
    net = feature_network(8, cache)
    assert time.perf_counter() - start < train_seconds / 5
    assert_same_weights(weights(net), cached)


@pytest.mark.parametrize("damage", ["garbage", "flipped weight byte"])
def test_a_corrupt_cache_file_is_retrained_and_rewritten(cached8, tmp_path, damage):
    cache, cached, _ = cached8
    shutil.copytree(cache, tmp_path / "cache")
    path = cache_file(tmp_path / "cache")
    data = bytearray(path.read_bytes())
    if damage == "garbage":
        data = bytearray(b"not a safetensors file")
    else:
        data[-5] ^= 0xFF  # inside the last tensor: the header still parses, the weight hash does not match
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="unusable.*retraining"):
        net = feature_network(8, tmp_path / "cache")
    assert_same_weights(weights(net), cached)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_weights(weights(feature_network(8, tmp_path / "cache")), cached)  # the rewritten file loads


def test_an_unwritable_cache_warns_and_still_gives_the_network(cached8, tmp_path):
    blocked = tmp_path / "a file, not a folder"
    blocked.write_text("")
    with pytest.warns(UserWarning, match="could not cache.*STABLEDIFF_CACHE"):
        net = feature_network(8, blocked)
    assert_same_weights(weights(net), cached8[1])


def test_the_fingerprint_depends_on_the_training_data():
    assert fingerprint(8) == fingerprint(8) != fingerprint(32)


def test_the_cache_folder_comes_from_stablediff_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("STABLEDIFF_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("STABLEDIFF_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "stablediff")


def test_features_are_float64_of_the_feature_dimension_and_repeatable(digits32):
    _, held = load_digits(32)
    again = features(held.images[:50], digits32["cache"])
    assert again.dtype == np.float64 and again.shape == (50, FEATURE_DIM)
    np.testing.assert_array_equal(again, digits32["held"][:50])


def test_features_refuse_images_that_are_not_uint8_rgb_squares(digits32):
    with pytest.raises(ValueError, match="uint8"):
        features(np.zeros((2, 32, 32), dtype=np.uint8), digits32["cache"])


def test_fd_of_real_held_out_against_real_train_is_far_below_noise_and_wrong_digits(digits32):
    train = digits32["train"]
    real = frechet_distance(digits32["held"], train)
    assert real.warning is None and real.count == len(digits32["held"])
    assert real.value < 0.1 * frechet_distance(digits32["ones"], train).value
    assert real.value < 0.02 * frechet_distance(digits32["noise"], train).value


def test_kid_of_real_held_out_against_real_train_is_near_zero_and_far_below_noise_and_wrong_digits(digits32):
    train = digits32["train"]
    real = kernel_inception_distance(digits32["held"], train, num_subsets=20)
    ones = kernel_inception_distance(digits32["ones"], train, num_subsets=20)
    noise = kernel_inception_distance(digits32["noise"], train, num_subsets=20)
    assert abs(real.value) < 3 * real.spread
    assert abs(real.value) < 0.02 * ones.value and abs(real.value) < 0.02 * noise.value
