"""txt2img, img2img and inpainting through the API: seeds, strength, masks and sizes."""

import numpy as np
import pytest
from PIL import Image

from tests.inference.conftest import pixels

PROMPT = "a handwritten digit two"


def halves(left, right) -> Image.Image:
    array = np.zeros((16, 16, 3), np.uint8)
    array[:, :8], array[:, 8:] = left, right
    return Image.fromarray(array)


def test_same_seed_same_image_and_another_seed_another(loaded):
    first, second = (loaded.txt2img(PROMPT, steps=3, seed=21)[0] for _ in range(2))
    other = loaded.txt2img(PROMPT, steps=3, seed=22)[0]
    assert np.array_equal(pixels(first), pixels(second))
    assert not np.array_equal(pixels(first), pixels(other))


def test_image_i_of_a_batch_is_the_image_of_seed_plus_i_alone(loaded):
    batch = loaded.txt2img(PROMPT, steps=3, seed=40, num=3)
    alone = loaded.txt2img(PROMPT, steps=3, seed=42)[0]
    assert np.abs(pixels(batch[2]) - pixels(alone)).max() <= 1  # batched matmuls may round differently
    assert "Seed: 42" in batch[2].info["parameters"] and "Seed: 40" in batch[0].info["parameters"]


def test_negative_prompt_and_guidance_change_the_image(loaded):
    base = pixels(loaded.txt2img(PROMPT, steps=3, seed=1)[0])
    assert not np.array_equal(pixels(loaded.txt2img(PROMPT, steps=3, seed=1, negative_prompt="blurry")[0]), base)
    assert not np.array_equal(pixels(loaded.txt2img(PROMPT, steps=3, seed=1, guidance_scale=7.0)[0]), base)


def test_img2img_follows_the_init_image_the_more_the_lower_the_strength(loaded):
    red_blue, green_white = halves((200, 30, 30), (20, 40, 220)), halves((20, 240, 30), (250, 250, 250))

    def gap(strength, steps):  # how much the output depends on the init image, same seed
        a, b = (loaded.img2img(PROMPT, init, strength=strength, steps=steps, seed=1)[0]
                for init in (red_blue, green_white))
        return np.abs(pixels(a) - pixels(b)).mean()

    low, mid, full = gap(0.05, 20), gap(0.3, 10), gap(1.0, 10)
    assert low > 5 * mid > 0 and mid > 5 * full  # at strength 1 the init is (almost) pure noise


def test_img2img_output_size_is_the_init_images_or_the_requested(loaded):
    init = Image.new("RGB", (32, 16), "gray")
    assert loaded.img2img(PROMPT, init, strength=0.5, steps=2)[0].size == (32, 16)
    image = loaded.img2img(PROMPT, init, strength=0.5, steps=2, size=(16, 16))[0]
    assert image.size == (16, 16) and "Denoising strength: 0.5" in image.info["parameters"]


def test_a_strength_that_runs_no_step_is_refused(loaded):
    with pytest.raises(ValueError, match="runs no denoising step.*at least 10"):
        loaded.img2img(PROMPT, Image.new("RGB", (16, 16)), strength=0.1, steps=5)


def test_inpainting_keeps_unmasked_pixels_and_redraws_masked_ones(loaded):
    init = halves((200, 30, 30), (20, 40, 220))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 16, 8))  # redraw the top half
    out = pixels(loaded.inpaint(PROMPT, init, mask, strength=1.0, steps=3, seed=2)[0])
    assert np.array_equal(out[8:], pixels(init)[8:])
    assert np.abs(out[:8] - pixels(init)[:8]).mean() > 10


def test_a_size_the_model_cannot_make_is_refused_with_one_that_fits(loaded):
    with pytest.raises(ValueError, match="size 22x22 does not fit.*multiples of 8.*--size 24x24"):
        loaded.txt2img(PROMPT, steps=2, size=(22, 22))


@pytest.mark.parametrize("strength", [0.0, 1.5])
def test_a_strength_outside_zero_to_one_is_refused(strength):
    from stablediff.inference.pipeline import check_strength

    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        check_strength(strength, 20)
