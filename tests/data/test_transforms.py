"""Every supported mode becomes correct RGB, upright; resize, crop, flip and tensor range."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stablediff.data.sources import open_source
from stablediff.data.transforms import (
    ImageTransform,
    crop_box,
    load_rgb,
    resize_to_cover,
    to_rgb,
    to_tensor,
)

from .corpus import FORMATS, GOOD_CHECKS


@pytest.mark.parametrize("fmt", FORMATS)
def test_good_images_load_upright_with_the_right_colours(corpus_specs, fmt):
    seen = set()
    for sample in open_source(corpus_specs[fmt]):
        if sample.key not in GOOD_CHECKS:
            continue
        image = load_rgb(sample.image_bytes)
        size, pixels = GOOD_CHECKS[sample.key]
        assert image.mode == "RGB" and image.size == size, sample.key
        for xy, colour, tolerance in pixels:
            got = np.array(image.getpixel(xy), dtype=int)
            assert np.abs(got - colour).max() <= tolerance, (sample.key, xy, tuple(got), colour)
        seen.add(sample.key)
    assert seen == set(GOOD_CHECKS)


def test_half_transparent_pixels_blend_over_white():
    image = to_rgb(Image.new("RGBA", (4, 4), (255, 0, 0, 128)))
    assert image.getpixel((0, 0)) == (255, 127, 127)


def test_sixteen_bit_big_endian_is_scaled_not_clipped():
    image = Image.frombytes("I;16B", (4, 4), np.full((4, 4), 257 * 200, dtype=">u2").tobytes())
    assert to_rgb(image).getpixel((0, 0)) == (200, 200, 200)


def test_resize_to_cover_keeps_aspect_and_covers_the_target():
    image = Image.new("RGB", (200, 100))
    resized = resize_to_cover(image, 64, 64)
    assert resized.size == (128, 64)
    assert resize_to_cover(Image.new("RGB", (100, 300)), 64, 128).size == (64, 192)


def test_center_crop_is_centred_and_random_crop_is_seeded():
    assert crop_box((128, 64), (64, 64), False, None) == (32, 0, 96, 64)
    boxes = [crop_box((128, 64), (64, 64), True, np.random.default_rng(7)) for _ in range(2)]
    assert boxes[0] == boxes[1]
    with pytest.raises(ValueError, match="rng"):
        crop_box((128, 64), (64, 64), True, None)


def test_transform_gives_a_tensor_in_minus_one_to_one():
    image = Image.new("RGB", (96, 64), (255, 0, 0))
    image.paste((0, 0, 0), (0, 0, 48, 64))
    tensor, (top, left) = ImageTransform(size=(32, 32))(image)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert tensor.min() == -1.0 and tensor.max() == 1.0
    assert (top, left) == (0, 8)  # resized to 48x32, centred


def test_flip_mirrors_the_image_and_bucket_size_overrides():
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 32, 32))  # white left half
    flip = ImageTransform(size=(16, 16), flip_probability=1.0)
    tensor, _ = flip(image, rng=np.random.default_rng(0), size=(64, 32))
    assert tensor.shape == (3, 32, 64)
    assert tensor[:, :, 0].max() == -1.0 and tensor[:, :, -1].min() == 1.0


def test_to_tensor_maps_0_and_255_exactly():
    image = Image.new("RGB", (2, 1), (0, 0, 0))
    image.putpixel((1, 0), (255, 255, 255))
    tensor = to_tensor(image)
    assert tensor[:, 0, 0].tolist() == [-1.0] * 3 and tensor[:, 0, 1].tolist() == [1.0] * 3
