"""Where each image goes before the VAE sees it: its bucket, its crop(s), and their cache namespace.

With bucketing off there is one bucket, the `resolution` square. With it on,
each image goes to the bucket nearest its aspect ratio (`buckets.nearest_bucket`),
is resized to cover it and cropped to it.

Random crops and the feature cache: a cached latent cannot be re-cropped in
pixel space (each latent pixel summarises an 8x8 patch and the VAE's receptive
field reaches past the crop edge), and re-encoding per step would give up the
cache's speed-up. So random crops are drawn *before* encoding: `variants` crops
per image, each drawn from (seed, sample key, variant) alone, each encoded and
cached once under its own transform id, and the training step picks one per
sample with its step generator, as it does for flipped latents. Augmentation
is then limited to those `variants` crops; raise `data.crop_variants` for more.

This module needs only PIL and numpy: ingest workers import it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import blake3
import numpy as np
from PIL import Image

from stablediff.data.buckets import Bucket, nearest_bucket
from stablediff.data.transforms import crop_box, resize_to_cover
from stablediff.errors import ConfigError

CropMode = Literal["center", "random"]


@dataclass(frozen=True)
class CropPolicy:
    """The buckets and crop policy: a pure function from (image, key) to crops."""

    sizes: tuple[Bucket, ...]  # (width, height) of each bucket
    crop: CropMode = "center"
    variants: int = 1  # crops cached per image (random crop only)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sizes:
            raise ValueError("a crop policy needs at least one bucket size")
        if self.crop not in ("center", "random"):
            raise ConfigError(f"data.crop must be 'center' or 'random', got {self.crop!r}")
        if self.variants < 1 or (self.crop == "center" and self.variants != 1):
            raise ConfigError(f"data.crop_variants = {self.variants}: a centre crop has exactly 1 variant; "
                              "set data.crop: random for more")

    @classmethod
    def square(cls, resolution: int, crop: CropMode = "center", variants: int = 1, seed: int = 0) -> CropPolicy:
        return cls(((resolution, resolution),), crop, variants, seed)

    def bucket_of(self, width: int, height: int) -> int:
        return nearest_bucket(width, height, self.sizes)

    def transform_id(self, bucket: int, variant: int = 0) -> str:
        """The feature cache's name for this bucket's (and variant's) resize and crop.

        A square bucket keeps the pre-bucketing name (`cover-center-512`), so caches made
        before bucketing existed stay valid.
        """
        width, height = self.sizes[bucket]
        size = str(width) if width == height else f"{width}x{height}"
        if self.crop == "center":
            return f"cover-center-{size}"
        return f"cover-random-{size}-seed{self.seed}-v{variant}"

    def crop_rng(self, key: str, variant: int) -> np.random.Generator:
        """The generator of one random crop: depends on (seed, sample key, variant) only."""
        key_bits = int(blake3.blake3(key.encode("utf-8", "surrogatepass")).hexdigest()[:32], 16)
        return np.random.default_rng([self.seed, key_bits, variant])

    def frame(self, image: Image.Image, key: str) -> tuple[int, list[np.ndarray]]:
        """(bucket index, one (h, w, 3) uint8 crop per variant) of an upright RGB image."""
        bucket = self.bucket_of(*image.size)
        width, height = self.sizes[bucket]
        resized = resize_to_cover(image, width, height)
        random_crop = self.crop == "random"
        crops = []
        for variant in range(self.variants):
            rng = self.crop_rng(key, variant) if random_crop else None
            crops.append(np.array(resized.crop(crop_box(resized.size, (width, height), random_crop, rng))))
        return bucket, crops

    def is_square_center(self, resolution: int) -> bool:
        """True when every crop equals the plain `resolution` centre crop (bucketing and random crop off)."""
        return self.sizes == ((resolution, resolution),) and self.crop == "center"


def center_square(image: Image.Image, resolution: int) -> np.ndarray:
    """The (R, R, 3) uint8 centre crop: what the VAE stage trains and evaluates on."""
    resized = resize_to_cover(image, resolution, resolution)
    return np.array(resized.crop(crop_box(resized.size, (resolution, resolution), False, None)))
