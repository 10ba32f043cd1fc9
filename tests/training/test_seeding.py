"""isolated_rng: what runs inside draws from the global generators without moving them for what follows."""

from __future__ import annotations

import random

import numpy as np
import torch

from stablediff.training.seeding import isolated_rng, seed_everything


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_draws_inside_leave_every_global_generator_where_it_was():
    seed_everything(7)
    expected = draws()
    seed_everything(7)
    with isolated_rng():
        inside = draws()  # the same generators, from where they stood
        random.shuffle(list(range(100)))
        np.random.permutation(1000)
        torch.randn(1000)
    assert inside == expected
    assert draws() == expected  # as if nothing had been drawn


def test_the_state_comes_back_when_the_block_raises():
    seed_everything(3)
    expected = draws()
    seed_everything(3)
    try:
        with isolated_rng():
            torch.randn(10)
            np.random.rand(10)
            raise RuntimeError("evaluation failed")
    except RuntimeError:
        pass
    assert draws() == expected
