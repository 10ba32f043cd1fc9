"""Caption tag shuffling, as cached variants.

Caption dropout (for classifier-free guidance) is not here: training drops a
caption by picking the empty caption's embedding row (`training.batches.caption_rows`).
"""

from __future__ import annotations

import random
from typing import Protocol


class Shuffler(Protocol):
    """A `numpy.random.Generator` or a `random.Random`: the generator is always explicit, so a
    run's captions are reproducible from its seed."""

    def shuffle(self, x: list) -> None: ...


def shuffle_tags(caption: str, rng: Shuffler, keep_tokens: int = 0, separator: str = ",") -> str:
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


def shuffled_variants(caption: str, count: int, seed: int, sample_index: int, keep_tokens: int = 0) -> list[str]:
    """`count` tag-shuffled versions of a caption (the first is the caption as written).

    Training draws one variant per step, so shuffling works with cached text
    embeddings: each variant is encoded once, like any other caption. The
    variants are a pure function of (seed, sample_index).
    """
    rng = random.Random(f"{seed}/{sample_index}")
    variants = [caption]
    for _ in range(count - 1):
        variants.append(shuffle_tags(caption, rng, keep_tokens))
    return list(dict.fromkeys(variants))  # a one-tag caption has one variant
