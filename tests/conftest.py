"""Shared fixtures: real tiny components, built once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """Run `stablediff ARGS...` as a real subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "stablediff", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory produced by `stablediff train tiny` (a few seconds)."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    result = run_cli("train", "tiny", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of `tiny_run` that a test may damage."""
    target = tmp_path / "run"
    shutil.copytree(tiny_run, target)
    return target
