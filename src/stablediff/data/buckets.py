"""Aspect-ratio bucketing: train on whole images of many shapes without padding or heavy crops.

Each image goes to the bucket (a width x height, sides multiples of 64) whose
aspect ratio is nearest its own; a batch holds images of one bucket only, so
every tensor in it has the same shape. The default bucket list follows the
NovelAI / kohya recipe: for each width from `min_side` to `max_side` in steps
of 64, the tallest height (multiple of 64) that keeps the area within the
area of `resolution`, and its transpose.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from stablediff.errors import ConfigError

Bucket = tuple[int, int]  # (width, height)


def make_buckets(resolution: Bucket = (512, 512), min_side: int = 256, max_side: int = 1024,
                 step: int = 64) -> list[Bucket]:
    """Every bucket with sides in [min_side, max_side], multiples of `step`, area <= resolution's.

    Sorted by aspect ratio (width / height), narrowest first; always holds `resolution` itself.
    """
    if min_side % step or max_side % step or min_side > max_side:
        raise ValueError(f"bucket sides must be multiples of {step} with min_side <= max_side; "
                         f"got min_side={min_side}, max_side={max_side}")
    max_area = resolution[0] * resolution[1]
    buckets: set[Bucket] = {resolution}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, (max_area // width) // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket nearest in aspect ratio, measured as |log ratio| so that
    2:1 and 1:2 are equally far from square. Ties go to the larger bucket."""
    target = math.log(width / height)
    return min(range(len(buckets)),
               key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - target),
                              -buckets[i][0] * buckets[i][1], i))


def bucket_batches(bucket_ids: Sequence[int], batch_size: int, seed: int, epoch: int = 0,
                   drop_last: bool = False) -> list[list[int]]:
    """Sample indices grouped into batches of one bucket each, in a seeded order.

    A pure function of its arguments: the same (seed, epoch) always gives the
    same batches, so a resumed run can skip the batches it has already seen.
    Indices are shuffled within each bucket, cut into batches (the last batch
    of a bucket may be smaller unless `drop_last`), and the batches shuffled.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    members: dict[int, list[int]] = defaultdict(list)
    for index, bucket in enumerate(bucket_ids):
        members[bucket].append(index)
    batches: list[list[int]] = []
    for bucket in sorted(members):  # sorted: dict order must not leak into the result
        order = rng.permutation(np.asarray(members[bucket]))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size].tolist()
            if len(batch) == batch_size or not drop_last:
                batches.append(batch)
    return [batches[i] for i in rng.permutation(len(batches))]


def resolve_buckets(spec: str | Sequence[Sequence[int]] | None, resolution: int, step: int) -> list[Bucket] | None:
    """`data.buckets` as a bucket list: None (off), "auto", or explicit [width, height] pairs.

    `step` is the side granularity, 8 x the VAE's downscale (64 for Stable Diffusion):
    it keeps every latent side a multiple of 8, which the UNet's downsamplings need.
    "auto" is the kohya list for `resolution`: sides from resolution/2 to 2 x resolution,
    area at most resolution².
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "auto":
            raise ConfigError(f"data.buckets: {spec!r} is neither 'auto' nor a list of [width, height] pairs")
        low = max(step, resolution // 2 // step * step)
        high = max(low, 2 * resolution // step * step)
        return make_buckets((resolution, resolution), min_side=low, max_side=high, step=step)
    buckets = sorted({(int(w), int(h)) for w, h in spec}, key=lambda b: (b[0] / b[1], b[0]))
    bad = [f"{w}x{h}" for w, h in buckets if w % step or h % step or w <= 0 or h <= 0]
    if bad or not buckets:
        raise ConfigError(f"data.buckets: every side must be a positive multiple of {step} (8 x the VAE's "
                          f"downscale, so latents fit the UNet); {', '.join(bad) or 'an empty list'} "
                          f"is not. Round them, or use data.buckets: auto")
    return buckets
