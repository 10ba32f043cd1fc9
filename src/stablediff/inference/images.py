"""Input images for img2img and inpainting: read, orient, convert and fit to the output size.

A mask of another size than the init image is resized to the output size when
its aspect ratio is the init image's (a mask painted at half resolution is
still the same mask); a mask of another shape is refused, since stretching it
would cover pixels the user did not paint.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from stablediff.data.transforms import to_rgb
from stablediff.errors import GenerationError, MissingPathError

ASPECT_TOLERANCE = 0.01


def read_image(path: Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise MissingPathError(f"{what} {path} does not exist; give the path of a PNG or JPEG image") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise GenerationError(f"{what} {path} cannot be read as an image ({exc}); give a PNG or JPEG image, "
                              "re-saved if it is truncated") from None


def open_init_image(path: Path, size: tuple[int, int] | None) -> Image.Image:
    """The init image in RGB, resized to `size` (width, height) when given."""
    image = to_rgb(read_image(path, "init image"))
    if size is not None and image.size != tuple(size):
        image = image.resize(size, Image.LANCZOS)
    return image


def open_mask(path: Path, init_size: tuple[int, int], size: tuple[int, int]) -> Image.Image:
    """The mask in mode L at `size`; white = redraw, black = keep. `init_size` is the init image's own size."""
    mask = read_image(path, "mask")
    if mask.mode in ("RGBA", "LA"):
        mask = to_rgb(mask)
    mask = mask.convert("L")
    if mask.size != tuple(init_size):
        mask_ratio, init_ratio = mask.width / mask.height, init_size[0] / init_size[1]
        if abs(mask_ratio / init_ratio - 1) > ASPECT_TOLERANCE:
            raise GenerationError(f"mask {path} is {mask.width}x{mask.height} but the init image is "
                                  f"{init_size[0]}x{init_size[1]}: a different shape, so it cannot be scaled to fit. "
                                  "Paint the mask over the init image at its size (white = redraw, black = keep)")
    if mask.size != tuple(size):
        mask = mask.resize(size, Image.NEAREST)  # nearest: a resized mask stays black and white
    return mask
