"""`builtin:digits` (train split) and `builtin:digits:held_out` as a source like any other.

A selector picks some of the digits: `builtin:digits?digits=9&count=20`,
`builtin:digits:held_out?digits=0-8`. `digits` is a list of digits and ranges
(`9`, `0-8`, `1,3,5-7`); `count=N` keeps the first N training images of those
digits in the fixed split's order, so a run gets the same N images whatever
its seed. The held-out split of a selection holds every held-out image of the
selected digits (`count` limits training images only), so a validation loss
measures the digits a run trains on.

The images are encoded to PNG so that the built-in set goes through the same
validation, hashing and caching as a user's files. Each digit gets one of its
caption templates in turn, so the set covers all of them.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from stablediff.data.sources.base import RawSample, Source, SourceError

BUILTIN_PREFIX = "builtin:"
SPLITS = ("train", "held_out")
ALL_DIGITS = tuple(range(10))
SYNTAX = ("builtin:digits[:held_out][?digits=LIST_OR_RANGE][&count=N], e.g. builtin:digits?digits=9&count=20, "
          "builtin:digits?digits=0-8 or builtin:digits:held_out?digits=1,3,5-7")


@dataclass(frozen=True)
class DigitSelection:
    """Which digits, and how many training images of them (None: all)."""

    digits: tuple[int, ...] = ALL_DIGITS
    count: int | None = None

    def train_indices(self, labels: np.ndarray) -> np.ndarray:
        """Indices into the train split: the selected digits in split order, the first `count` of them."""
        chosen = np.flatnonzero(np.isin(labels, self.digits))
        return chosen[: self.count] if self.count is not None else chosen

    def held_out_indices(self, labels: np.ndarray) -> np.ndarray:
        """Indices into the held-out split: every image of the selected digits."""
        return np.flatnonzero(np.isin(labels, self.digits))

    def check_available(self, train_labels: np.ndarray, spec: str) -> None:
        """`count` is at most the training images the selected digits have."""
        available = int(np.isin(train_labels, self.digits).sum())
        if self.count is not None and self.count > available:
            raise SourceError(f"{spec!r}: count={self.count} asks for more training images than the selected "
                              f"digits have ({available}); give count=1 to {available}, or select more digits. "
                              f"The syntax is {SYNTAX}")


@dataclass(frozen=True)
class BuiltinSpec:
    split: str  # one of SPLITS
    selection: DigitSelection


def parse_builtin(spec: str) -> BuiltinSpec:
    """The split and selection a `builtin:digits[:split][?selector]` spec names."""
    body, has_query, query = spec[len(BUILTIN_PREFIX):].partition("?")
    name, _, split = body.partition(":")
    if name != "digits":
        raise SourceError(f"unknown built-in data set {spec!r}; the built-in one is builtin:digits ({SYNTAX})")
    split = split or "train"
    if split not in SPLITS:
        raise SourceError(f"unknown split {split!r} of builtin:digits in {spec!r}; use one of "
                          f"{', '.join(SPLITS)} ({SYNTAX})")
    return BuiltinSpec(split, _parse_selection(spec, query) if has_query else DigitSelection())


def _parse_selection(spec: str, query: str) -> DigitSelection:
    values: dict[str, str] = {}
    for part in query.split("&"):
        key, has_value, value = part.partition("=")
        if not part:
            raise _bad(spec, "an empty part (a stray ? or &)")
        if key not in ("digits", "count"):
            raise _bad(spec, f"unknown selector key {key!r} (the keys are digits and count)")
        if not has_value or not value:
            raise _bad(spec, f"{key} needs a value ({key}=...)")
        if key in values:
            raise _bad(spec, f"{key} is given twice")
        values[key] = value
    digits = _parse_digits(spec, values["digits"]) if "digits" in values else ALL_DIGITS
    count = _parse_count(spec, values["count"]) if "count" in values else None
    return DigitSelection(digits, count)


def _parse_digits(spec: str, text: str) -> tuple[int, ...]:
    """`9`, `0-8`, `1,3,5-7` -> the sorted digits, each once."""
    chosen: set[int] = set()
    for item in text.split(","):
        low, dash, high = item.partition("-")
        if not (_is_number(low) and (_is_number(high) or not dash)):
            raise _bad(spec, f"digits={text}: {item!r} is neither a digit nor a range like 0-8")
        first, last = int(low), int(high) if dash else int(low)
        if first > 9 or last > 9:
            raise _bad(spec, f"digits={text}: {item!r} is outside 0-9")
        if first > last:
            raise _bad(spec, f"digits={text}: the range {item!r} runs backwards; write {last}-{first}")
        chosen.update(range(first, last + 1))
    return tuple(sorted(chosen))


def _parse_count(spec: str, text: str) -> int:
    if not _is_number(text) or int(text) < 1:
        raise _bad(spec, f"count={text} must be a whole number of images, 1 or more")
    return int(text)


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()  # isdigit alone takes '²', which int() refuses


def _bad(spec: str, what: str) -> SourceError:
    return SourceError(f"bad selector in {spec!r}: {what}. The syntax is {SYNTAX}")


def png_bytes(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class DigitsSource(Source):
    """scikit-learn's handwritten digits, upscaled to RGB (see `stablediff.data.digits`), or a selection of them.

    The selector is checked here: its syntax at once, a `count` against the images there are (which loads
    the digits, so only when a count is given), so `data check` and a run's pre-flight refuse a bad one.
    """

    def __init__(self, spec: str = "builtin:digits", resolution: int = 32) -> None:
        self.spec = spec
        parsed = parse_builtin(spec)
        self.split, self.selection = parsed.split, parsed.selection
        self.resolution = resolution
        if self.selection.count is not None:
            self.selection.check_available(self._splits()[0].labels, spec)

    def _splits(self):
        from stablediff.data.digits import load_digits  # sklearn is imported only when used

        return load_digits(self.resolution)

    def __iter__(self) -> Iterator[RawSample]:
        train, held_out = self._splits()
        if self.split == "train":
            split, indices = train, self.selection.train_indices(train.labels)
        else:
            split, indices = held_out, self.selection.held_out_indices(held_out.labels)
        for index in map(int, indices):  # the index in the whole split: a sample's key and caption do not
            captions = split.captions_for(index)  # depend on the selection it was picked by
            caption = captions[index % len(captions)]
            yield RawSample(f"digits/{self.split}/{index:04d}", png_bytes(split.images[index]),
                            caption, None, f"{self.spec}#{index}")
