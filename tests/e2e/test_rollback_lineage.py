"""Rollback lineage as a user meets it: SIGKILL right after a divergence rollback, then the same command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stablediff.checkpoint import CheckpointStore
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow
# LR 1e4 turns the weights to NaN at once: every step is bad, so the guard rolls back, twice, then stops.
DIVERGING = ["train", "tiny", "--set", "train.threads=1", "--set", "train.tensorboard=false",
             "--set", "train.learning_rate=1e4", "--set", "train.grad_clip=null", "--set", "train.warmup_steps=0",
             "--set", "train.max_steps=30", "--set", "checkpoint.every_steps=1", "--set", "guard.min_history=2",
             "--set", "guard.max_events=3", "--set", "guard.within_steps=10", "--set", "guard.max_rollbacks=2"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rollbacks(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if r.get("event") == "rollback"]


def newest_state(run_dir: Path) -> tuple[dict, dict]:
    """The newest loadable checkpoint's meta (but the config, which names the run dir) and chunk hashes."""
    loaded = CheckpointStore(run_dir / "checkpoints").load()
    meta = {k: v for k, v in loaded.meta.items() if k != "config"}
    return meta, {name: entry.chunks for name, entry in loaded.manifest.tensors.items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = run_cli(*DIVERGING, "--run-dir", str(run_dir))
    assert result.returncode == 1 and "diverged again" in result.stderr, result.stderr
    return run_dir


def kill_right_after_the_first_rollback(run_dir: Path) -> str:
    proc = subprocess.Popen([sys.executable, "-m", "stablediff", *DIVERGING, "--run-dir", str(run_dir)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "rolled back to step" in line:
            proc.kill()
            break
    proc.wait()
    assert proc.returncode == -9, "the run ended before its first rollback"
    return line


def test_sigkill_right_after_a_rollback_resumes_the_rolled_back_trajectory(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    kill_right_after_the_first_rollback(run_dir)
    first = rollbacks(run_dir)[0]
    assert first["lr_scale"] == 0.5 and first["abandoned"] and min(first["abandoned"]) > first["step"]

    result = run_cli(*DIVERGING, "--run-dir", str(run_dir))
    assert result.returncode == 1 and "diverged again at step" in result.stderr and "after 2 rollbacks" in result.stderr
    assert f"resumed from step {first['step']}\n" in result.stderr  # the target, not an abandoned checkpoint
    assert "continuing after the divergence rollback" in result.stderr
    assert [r["lr_scale"] for r in rollbacks(run_dir)] == [0.5, 0.25]  # the second rollback lowers it further
    records = metrics(run_dir)
    killed_at = records.index(next(r for r in records if r.get("event") == "rollback"))
    after = next(r for r in records[killed_at:] if "lr" in r)  # the resumed run's first logged step
    before = next(r for r in records[:killed_at] if r.get("step") == after["step"])
    assert after["lr"] == pytest.approx(before["lr"] * 0.5)
    assert newest_state(run_dir) == newest_state(uninterrupted)  # same LR, guard, data position, weights


def test_ckpt_list_hides_abandoned_checkpoints_and_all_shows_them_marked(uninterrupted):
    plain = run_cli("ckpt", "list", str(uninterrupted))
    assert plain.returncode == 0 and "abandoned by rollback" not in plain.stdout
    assert "abandoned by divergence rollbacks are not shown" in plain.stdout
    every = run_cli("ckpt", "list", str(uninterrupted), "--all")
    assert every.returncode == 0, every.stderr
    assert "abandoned by rollback 1" in every.stdout and "abandoned by rollback 2" in every.stdout
