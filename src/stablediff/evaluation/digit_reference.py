"""What a perfect digits generator would score: real training digits in place of generated ones.

FD and KID are biased upwards by a small sample, so "near 0" is not the bar for 100
generated images. The fair bar is the same number of *real* digits (from the training split,
balanced over the ten classes like the generated ones) scored against the same held-out
reference, in the same feature space and with the same KID subsets. `stablediff demo`
prints it next to the model's numbers.
"""

from __future__ import annotations

import warnings

import numpy as np

from stablediff.data.digits import load_digits
from stablediff.evaluation import digit_features
from stablediff.evaluation.frechet import SampleCountWarning, Score, frechet_distance, kernel_inception_distance
from stablediff.evaluation.settings import KID_SUBSET_SIZE, KID_SUBSETS

NUM_CLASSES = 10


def balanced_indices(labels: np.ndarray, count: int) -> np.ndarray:
    """`count` indices into `labels`, the first ones of each class in turn (class 0, 1, ... 9, 0, ...),
    so any count is as balanced as the generated digits' prompts are."""
    per_class = [np.flatnonzero(labels == c).tolist() for c in range(NUM_CLASSES)]
    chosen: list[int] = []
    rank = 0
    while len(chosen) < count:
        row = [members[rank] for members in per_class if rank < len(members)]
        if not row:
            raise ValueError(f"the split holds {len(chosen)} digits, fewer than the {count} asked for")
        chosen += row[: count - len(chosen)]
        rank += 1
    return np.array(sorted(chosen))


def real_reference(count: int, resolution: int = 32, seed: int = 0) -> dict[str, Score]:
    """{"fd": Score, "kid": Score} of `count` real training digits against the real held-out split."""
    train, held_out = load_digits(resolution)
    picked = train.images[balanced_indices(train.labels, count)]
    real = digit_features.features(picked)
    reference = digit_features.real_features("held_out", resolution)
    with warnings.catch_warnings():  # the generated digits' FD carries the same caveat; it is in Score.warning
        warnings.simplefilter("ignore", SampleCountWarning)
        fd = frechet_distance(real, reference)
    return {"fd": fd,
            "kid": kernel_inception_distance(real, reference, num_subsets=KID_SUBSETS,
                                             subset_size=KID_SUBSET_SIZE, seed=seed)}
