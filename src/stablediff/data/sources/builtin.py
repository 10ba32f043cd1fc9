"""`builtin:digits` (train split) and `builtin:digits:held_out` as a source like any other.

The images are encoded to PNG so that the built-in set goes through the same
validation, hashing and caching as a user's files. Each digit gets one of its
caption templates in turn, so the set covers all of them.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

from PIL import Image

from stablediff.data.sources.base import RawSample, Source, SourceError

BUILTIN_PREFIX = "builtin:"
SPLITS = ("train", "held_out")


def parse_builtin(spec: str) -> str:
    """The split a `builtin:digits[:split]` spec names."""
    name, _, split = spec[len(BUILTIN_PREFIX):].partition(":")
    if name != "digits":
        raise SourceError(f"unknown built-in data set {spec!r}; the built-in one is builtin:digits")
    split = split or "train"
    if split not in SPLITS:
        raise SourceError(f"unknown split {split!r} of builtin:digits; "
                          f"use one of {', '.join(SPLITS)}")
    return split


def png_bytes(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class DigitsSource(Source):
    """scikit-learn's handwritten digits, upscaled to RGB (see `stablediff.data.digits`)."""

    def __init__(self, spec: str = "builtin:digits", resolution: int = 32) -> None:
        self.spec = spec
        self.split = parse_builtin(spec)
        self.resolution = resolution

    def __iter__(self) -> Iterator[RawSample]:
        from stablediff.data.digits import load_digits  # sklearn is imported only when used

        train, held_out = load_digits(self.resolution)
        split = train if self.split == "train" else held_out
        for index in range(len(split)):
            captions = split.captions_for(index)
            caption = captions[index % len(captions)]
            yield RawSample(f"digits/{self.split}/{index:04d}", png_bytes(split.images[index]),
                            caption, None, f"{self.spec}#{index}")
