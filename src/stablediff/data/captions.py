"""Caption augmentations: dropout (for classifier-free guidance) and tag shuffling.

Both take the random generator explicitly (a `numpy.random.Generator` or a
`random.Random`), so a run's captions are reproducible from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from stablediff.errors import ConfigError


class RandomLike(Protocol):
    def random(self) -> float: ...
    def shuffle(self, x: list) -> None: ...


def caption_dropout(caption: str, probability: float, rng: RandomLike) -> str:
    """"" with `probability`, else the caption: trains the unconditional branch that
    classifier-free guidance needs (Ho & Salimans 2022; SD used p = 0.1)."""
    if not 0.0 <= probability <= 1.0:
        raise ConfigError(f"caption dropout probability must be in [0, 1], got {probability}")
    return "" if probability > 0 and rng.random() < probability else caption


def shuffle_tags(caption: str, rng: RandomLike, keep_tokens: int = 0, separator: str = ",") -> str:
    """Shuffle comma-separated tags, keeping the first `keep_tokens` in place (kohya's option).

    Tag-style captions ("1girl, solo, red hair") carry no word order, so
    shuffling keeps the model from learning position; the kept head is
    usually a trigger word or the subject.
    """
    tags = [tag.strip() for tag in caption.split(separator)]
    tags = [tag for tag in tags if tag]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    joiner = f"{separator} " if separator.strip() else separator  # "a, b" for commas
    return joiner.join(head + tail)


@dataclass(frozen=True)
class CaptionOptions:
    dropout: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0

    def apply(self, caption: str, rng: RandomLike) -> str:
        """Shuffle first, then drop: the random draws happen in the same order every time."""
        if self.shuffle:
            caption = shuffle_tags(caption, rng, self.keep_tokens)
        return caption_dropout(caption, self.dropout, rng)


def shuffled_variants(caption: str, count: int, seed: int, sample_index: int, keep_tokens: int = 0) -> list[str]:
    """`count` tag-shuffled versions of a caption (the first is the caption as written).

    Training draws one variant per step, so shuffling works with cached text
    embeddings: each variant is encoded once, like any other caption. The
    variants are a pure function of (seed, sample_index).
    """
    import random

    rng = random.Random(f"{seed}/{sample_index}")
    variants = [caption]
    for _ in range(count - 1):
        variants.append(shuffle_tags(caption, rng, keep_tokens))
    return list(dict.fromkeys(variants))  # a one-tag caption has one variant
