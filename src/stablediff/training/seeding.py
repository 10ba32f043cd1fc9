"""Randomness as a pure function of (seed, step, rank, stream).

Every random draw in a training step (noise, timesteps, caption dropout,
posterior samples) comes from a generator seeded from these numbers, so a
resumed run draws exactly what an uninterrupted run would have drawn, without
having to restore a generator's internal state.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

STREAMS = {"noise": 1, "timesteps": 2, "dropout": 3, "posterior": 4, "vae": 5, "init": 6, "sample": 7, "flip": 8, "offset": 9}


def step_generator(seed: int, step: int, rank: int, stream: str) -> torch.Generator:
    # numpy's SeedSequence mixes the tuple into well-spread 64-bit state.
    entropy = np.random.SeedSequence([seed, step, rank, STREAMS[stream]]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(entropy[0] >> np.uint64(1)))


def seed_everything(seed: int) -> None:
    """Global RNGs, for library code that draws from them (weight init, dropout)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Whatever runs inside draws from the global generators without moving them for what follows.

    torch's CPU generator and every CUDA device's (fork_rng), python's `random`
    and numpy's global state are saved and put back: an evaluation in the middle
    of a run (which may draw from any of them, e.g. a library's dropout or a
    shuffle) leaves the training's random stream exactly where it was.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
