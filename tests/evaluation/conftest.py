"""Fixtures of the evaluation tests: the hand-built run directory of hand_run.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.evaluation.hand_run import build_evaluated_run


@pytest.fixture
def evaluated_run(tmp_path) -> Path:
    return build_evaluated_run(tmp_path / "run")


@pytest.fixture(scope="session")
def make_evaluated_run():
    """`build_evaluated_run`, for fixtures of a wider scope than a test's."""
    return build_evaluated_run
