"""From decoded image to training pixels: RGB, upright, resized, cropped, then a tensor in [-1, 1].

`to_rgb` is where every supported mode becomes plain 8-bit RGB. Pillow's own
`convert("RGB")` gets three cases wrong for training data: it drops alpha
(transparent pixels keep whatever colour was stored under them, often black),
it clips 16-bit values instead of scaling them (a 16-bit grey image turns
white), and it ignores EXIF orientation. Those are handled here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:  # torch is imported where tensors are made: spawned ingest workers start without it
    import torch

WHITE = (255, 255, 255)
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def composite_over_white(image: Image.Image) -> Image.Image:
    """RGBA -> RGB with transparent areas white (what a viewer shows, and what SD trainers use)."""
    background = Image.new("RGB", image.size, WHITE)
    background.paste(image, mask=image.getchannel("A"))
    return background


def sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit (I;16*) or 32-bit integer grey -> 8-bit L, scaling 0..65535 to 0..255.

    Mode `I` is what Pillow gives for 16-bit PNGs on older versions, so its
    values are read as 16-bit too (clipped, in case of true 32-bit data).
    """
    values = np.asarray(image).astype(np.float64)  # handles the byte orders of I;16B/L/N
    scaled = np.clip(values, 0, 65535) / 257.0  # 65535 / 255 = 257 exactly
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any supported mode -> 8-bit RGB; alpha composited over white, 16-bit scaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_MODES:
        return sixteen_bit_to_l(image).convert("RGB")
    if mode == "P":
        # Palette transparency (tRNS) becomes real alpha only through RGBA.
        has_alpha = "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        return composite_over_white(image) if has_alpha else image
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return composite_over_white(image.convert("RGBA"))
    if mode in ("L", "1") and "transparency" in image.info:
        return composite_over_white(image.convert("RGBA"))
    # 1, L, CMYK (Pillow undoes Adobe's inverted CMYK when decoding), YCbCr, RGBX.
    return image.convert("RGB")


def upright_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, then RGB."""
    return to_rgb(ImageOps.exif_transpose(image))


def resize_to_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover width x height, aspect ratio kept: the shorter side fits exactly."""
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def crop_box(image_size: tuple[int, int], size: tuple[int, int], random_crop: bool,
             rng: np.random.Generator | None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a `size` window: centred, or uniformly random with `rng`."""
    (image_w, image_h), (width, height) = image_size, size
    spare_w, spare_h = image_w - width, image_h - height
    if random_crop:
        if rng is None:
            raise ValueError("a random crop needs an rng (numpy Generator) for reproducibility")
        left, top = int(rng.integers(0, spare_w + 1)), int(rng.integers(0, spare_h + 1))
    else:
        left, top = spare_w // 2, spare_h // 2
    return left, top, left + width, top + height


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> float32 (..., 3, H, W) in [-1, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(pixels)).movedim(-1, -3).float().div(127.5).sub(1.0)

