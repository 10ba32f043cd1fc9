"""`builtin:digits`: scikit-learn's 1,797 handwritten digits as a captioned image set.

The 8x8 grey images (values 0-16) are upscaled to RGB squares (32x32 by
default) and each gets several caption templates. The held-out split is fixed:
a seeded permutation independent of the run's seed, so every run and every tool
evaluates on the same 20%.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {n}",
    "digit {n}, handwritten",
    "a picture of the number {word}",
    "handwritten {word}",
    "{n}",
)
HELD_OUT_FRACTION = 0.2
_SPLIT_SEED = 1797  # fixed forever: changing it would change every reported metric


@dataclass(frozen=True)
class DigitsSplit:
    images: np.ndarray  # (N, R, R, 3) uint8
    labels: np.ndarray  # (N,) int64
    raw: np.ndarray  # (N, 8, 8) float, sklearn's 0-16 values

    def captions_for(self, index: int) -> list[str]:
        return digit_captions(int(self.labels[index]))

    def __len__(self) -> int:
        return len(self.labels)


def digit_captions(label: int) -> list[str]:
    return [t.format(word=NUMBER_WORDS[label], n=label) for t in CAPTION_TEMPLATES]


def upscale(raw: np.ndarray, resolution: int) -> np.ndarray:
    """(8, 8) values 0-16 -> (R, R, 3) uint8, white digit on black, bicubic."""
    grey = Image.fromarray(np.clip(raw * 16.0, 0, 255).astype(np.uint8), mode="L")
    big = grey.resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(big.convert("RGB"))


def downscale_to_raw(images: np.ndarray) -> np.ndarray:
    """(N, R, R, 3) uint8 -> (N, 64) in sklearn's 0-16 range: what the digit classifier reads."""
    out = np.empty((len(images), 64), dtype=np.float32)
    for i, image in enumerate(images):
        grey = Image.fromarray(image).convert("L").resize((8, 8), Image.BOX)
        out[i] = np.asarray(grey, dtype=np.float32).reshape(-1) / 16.0
    return out


@lru_cache(maxsize=4)
def load_digits(resolution: int = 32) -> tuple[DigitsSplit, DigitsSplit]:
    """(train, held_out) splits at the given resolution."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    raw = bunch.images.astype(np.float32)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    n_held = int(round(len(labels) * HELD_OUT_FRACTION))
    held, train = order[:n_held], order[n_held:]
    images = np.stack([upscale(r, resolution) for r in raw])
    return (DigitsSplit(images[train], labels[train], raw[train]),
            DigitsSplit(images[held], labels[held], raw[held]))
