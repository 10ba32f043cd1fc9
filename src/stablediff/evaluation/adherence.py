"""Prompt adherence on digits: does a classifier read the digit the prompt asked for?

The classifier is an RBF support-vector machine fit on the real training split,
after the same 32x32 -> 8x8 reduction applied to generated images, so real and
generated digits are judged through the same lens. Its accuracy on the real
held-out split is the reference a perfect generator would reach.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from stablediff.data.digits import downscale_to_raw, load_digits


@dataclass(frozen=True)
class AdherenceReport:
    adherence: float  # share of generated images read as the requested digit
    reference: float  # the classifier's accuracy on real held-out digits
    per_digit: dict[int, float]
    count: int


@lru_cache(maxsize=2)
def digit_classifier(resolution: int = 32):
    from sklearn.svm import SVC

    train, _ = load_digits(resolution)
    return SVC(gamma=0.001, C=10.0).fit(downscale_to_raw(train.images), train.labels)


def reference_accuracy(resolution: int = 32) -> float:
    _, held = load_digits(resolution)
    predicted = digit_classifier(resolution).predict(downscale_to_raw(held.images))
    return float((predicted == held.labels).mean())


def adherence(images: np.ndarray, requested: np.ndarray, resolution: int = 32) -> AdherenceReport:
    """images (N, R, R, 3) uint8 generated for the digits in `requested` (N,)."""
    predicted = digit_classifier(resolution).predict(downscale_to_raw(images))
    hits = predicted == requested
    per_digit = {int(d): float(hits[requested == d].mean()) for d in np.unique(requested)}
    return AdherenceReport(float(hits.mean()), reference_accuracy(resolution), per_digit, len(requested))


def generated_adherence(pipe, digits: Iterable[int], per_digit: int, *, steps: int = 20, guidance_scale: float = 3.0,
                        seed: int = 1000, resolution: int = 32,
                        stop: Callable[[], None] | None = None,
                        prompts: dict[int, str] | None = None) -> AdherenceReport:
    """`per_digit` images of "a handwritten digit <word>" (or `prompts[digit]`) for each digit (seeds from
    `seed`), classified."""
    from stablediff.data.digits import NUMBER_WORDS
    from stablediff.inference.pipeline import images_to_array, txt2img

    images, requested = [], []
    for digit in digits:
        if stop is not None:
            stop()
        prompt = (prompts or {}).get(digit, f"a handwritten digit {NUMBER_WORDS[digit]}")
        batch = txt2img(pipe, prompt, steps=steps,
                        guidance_scale=guidance_scale, seed=seed, num=per_digit)
        images += batch
        requested += [digit] * len(batch)
    return adherence(images_to_array(images), np.array(requested), resolution)
