"""Randomness as a pure function of (seed, step, rank, stream).

Every random draw in a training step (noise, timesteps, caption dropout,
posterior samples) comes from a generator seeded from these numbers, so a
resumed run draws exactly what an uninterrupted run would have drawn, without
having to restore a generator's internal state.
"""

from __future__ import annotations

import random

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
