"""Every supported mode becomes correct RGB, upright; resize, crop and tensor range."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stablediff.data.sources import open_source
from stablediff.data.transforms import crop_box, pixels_to_tensor, resize_to_cover, to_rgb, upright_rgb
from stablediff.data.validate import decode_image

from .corpus import FORMATS, GOOD_CHECKS


@pytest.mark.parametrize("fmt", FORMATS)
def test_good_images_load_upright_with_the_right_colours(corpus_specs, fmt):
    seen = set()
    for sample in open_source(corpus_specs[fmt]):
        if sample.key not in GOOD_CHECKS:
            continue
        image = upright_rgb(decode_image(sample.image_bytes))
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


def test_pixels_to_tensor_maps_0_and_255_exactly():
    image = Image.new("RGB", (2, 1), (0, 0, 0))
    image.putpixel((1, 0), (255, 255, 255))
    tensor = pixels_to_tensor(np.array(image))
    assert tensor[:, 0, 0].tolist() == [-1.0] * 3 and tensor[:, 0, 1].tolist() == [1.0] * 3
