"""Init images and masks: read, converted and fitted to the output size, or refused with a reason."""

import numpy as np
import pytest
from PIL import Image

from stablediff.inference.images import open_init_image, open_mask


def test_init_image_transparency_is_over_white_and_resized(tmp_path):
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    image = open_init_image(tmp_path / "clear.png", (16, 16))
    assert image.mode == "RGB" and image.size == (16, 16)
    assert np.asarray(image).min() == 255


def test_a_mask_of_the_same_shape_is_resized_and_stays_binary(tmp_path):
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    mask.save(tmp_path / "mask.png")
    fitted = np.asarray(open_mask(tmp_path / "mask.png", (64, 64), (16, 16)))
    assert fitted.shape == (16, 16) and set(np.unique(fitted)) == {0, 255}
    assert (fitted[:, :8] == 255).all() and (fitted[:, 8:] == 0).all()


def test_a_mask_of_another_shape_is_refused(tmp_path):
    Image.new("L", (32, 16)).save(tmp_path / "wide.png")
    with pytest.raises(ValueError, match="32x16 but the init image is 16x16: a different shape"):
        open_mask(tmp_path / "wide.png", (16, 16), (16, 16))


def test_unreadable_and_missing_images_are_refused(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="init image .*broken.png cannot be read as an image"):
        open_init_image(tmp_path / "broken.png", None)
    with pytest.raises(FileNotFoundError, match="mask .*gone.png does not exist"):
        open_mask(tmp_path / "gone.png", (16, 16), (16, 16))
