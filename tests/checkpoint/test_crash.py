"""Crash consistency under real SIGKILL at random instants (DESIGN invariant 1)."""

from __future__ import annotations

import random

import pytest

from .crash_check import check_after_kill, run_and_kill

KILLS_PER_RUN = 8


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_committed_checkpoint_survives_sigkill(tmp_path, seed):
    primary, replica = str(tmp_path / "primary"), str(tmp_path / "replica")
    rand = random.Random(seed)
    committed = 0
    for kill in range(KILLS_PER_RUN):
        run_and_kill(primary, replica, rand)
        outcome = check_after_kill(primary, replica)
        assert outcome.failures == [], f"kill {kill}: {outcome.failures}"
        committed = len(outcome.steps_present[primary])
    assert committed >= 2  # the writer really saved (and retention really ran) between kills
