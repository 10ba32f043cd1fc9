"""One writer per run directory, with real `stablediff` processes: a second one is refused naming the
holder, a SIGKILLed holder's lock is taken over with a warning, another run's replica is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stablediff.checkpoint import CheckpointStore
from stablediff.checkpoint.ownership import read_owner
from tests.conftest import REPO, run_cli

TINY = ["train", "tiny", "--set", "train.threads=1"]
LONG = [*TINY, "--set", "train.max_steps=100000"]  # runs until killed


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stablediff", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, what: str, limit_s: float = 300) -> None:
    """Poll until `condition()`; fail if the process ends first (a hang guard, not a speed check)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the trainer exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"no {what} after {limit_s} s"
        time.sleep(0.2)


def has_checkpoint(run_dir: Path) -> bool:
    manifests = run_dir / "checkpoints" / "manifests"
    return manifests.is_dir() and any(p.suffix == ".json" for p in manifests.iterdir())


def lock_names(run_dir: Path, pid: int) -> bool:
    try:
        return json.loads((run_dir / ".lock").read_text())["pid"] == pid
    except (OSError, ValueError, KeyError):
        return False


@pytest.fixture(scope="module")
def live_trainer(tmp_path_factory):
    """A `stablediff train` in stage 2 (one checkpoint committed) that owns a replica; killed at the end."""
    root = tmp_path_factory.mktemp("live")
    run_dir, replica = root / "run", root / "replica"
    proc = start(*LONG, "--set", f"checkpoint.replicas=[{replica}]", "--run-dir", str(run_dir))
    try:
        wait_for(lambda: has_checkpoint(run_dir), proc, "a committed checkpoint")
        yield proc, run_dir, replica
    finally:
        proc.kill()
        proc.communicate()


def assert_refused_by(result, proc: subprocess.Popen, command: str = "stablediff train") -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"is in use by pid {proc.pid} on " in result.stderr and f"({command})" in result.stderr
    assert "Traceback" not in result.stderr


def test_two_trains_started_at_once_one_refuses_and_the_other_finishes(tmp_path):
    run_dir = tmp_path / "run"
    procs = [start(*TINY, "--run-dir", str(run_dir)) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outputs
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    refusal = outputs[loser][1]
    assert f"run dir {run_dir} is in use by pid {procs[winner].pid} on " in refusal
    assert "(stablediff train); wait for it or pass another --run-dir" in refusal
    assert run_cli("ckpt", "verify", str(run_dir), "--deep").returncode == 0
    logged = [(r["stage"], r["step"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(logged) == len(set(logged)) and [s for stage, s in logged if stage == "unet"] == [2, 4]


def test_a_sigkilled_trainers_stale_lock_is_taken_over_with_a_warning(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(*LONG, "--run-dir", str(run_dir))
    try:
        wait_for(lambda: has_checkpoint(run_dir) and lock_names(run_dir, proc.pid), proc, "a checkpoint")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    result = run_cli("ckpt", "gc", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert f"took over the stale lock of {run_dir}: its holder, pid {proc.pid} on " in result.stderr
    assert "(stablediff train), is no longer running" in result.stderr
    assert (run_dir / ".lock").read_text() == ""  # released again
    assert run_cli("ckpt", "verify", str(run_dir), "--deep").returncode == 0


# The tests below share one live trainer (module scope: it runs until the module ends, so the
# tests above, which train themselves, come first).
def test_ckpt_gc_beside_a_live_trainer_is_refused(live_trainer):
    proc, run_dir, _ = live_trainer
    result = run_cli("ckpt", "gc", str(run_dir))
    assert_refused_by(result, proc)
    assert "run this command again" in result.stderr


def test_ckpt_gc_on_the_live_runs_replica_is_refused(live_trainer):
    proc, _, replica = live_trainer
    wait_for(lambda: (replica / "manifests").is_dir(), proc, "a replicated checkpoint")
    assert_refused_by(run_cli("ckpt", "gc", str(replica)), proc)


def test_ckpt_repair_and_data_cache_beside_a_live_trainer_are_refused(live_trainer, tmp_path):
    proc, run_dir, _ = live_trainer
    assert_refused_by(run_cli("ckpt", "repair", str(run_dir), "--replica", str(tmp_path / "r")), proc)
    assert_refused_by(run_cli("data", "cache", "tiny", "--run-dir", str(run_dir)), proc)
    assert not (tmp_path / "r").exists()


def test_read_only_commands_need_no_lock(live_trainer):
    _, run_dir, _ = live_trainer
    result = run_cli("ckpt", "list", str(run_dir))
    assert result.returncode == 0, result.stderr


def test_a_replica_owned_by_another_run_is_refused_at_start(live_trainer, tmp_path):
    _, other_run, replica = live_trainer
    owner = read_owner(CheckpointStore(replica))
    steps_before = CheckpointStore(replica).steps()
    result = run_cli(*TINY, "--set", f"checkpoint.replicas=[{replica}]", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 1, result.stderr
    assert f"replica {replica} belongs to another run" in result.stderr and str(other_run) in result.stderr
    assert "stage 1" not in result.stderr  # refused before any work
    assert read_owner(CheckpointStore(replica)) == owner
    assert set(steps_before) <= set(CheckpointStore(replica).steps())
