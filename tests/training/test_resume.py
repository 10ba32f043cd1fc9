"""A killed run resumes exactly: SIGKILL at random moments, then the same command, ends bitwise equal."""

import random
import signal
import subprocess
import sys
import time

import pytest

from stablediff.checkpoint import CheckpointStore
from tests.conftest import REPO, run_cli

STEPS = 10
ARGS = ["train", "tiny", "--set", f"train.max_steps={STEPS}", "--set", "checkpoint.every_steps=1",
        "--set", "train.threads=1"]


def final_hashes(run_dir):
    """name -> chunk hashes of the last checkpoint: weights, EMA, optimizer, RNG."""
    store = CheckpointStore(run_dir / "checkpoints")
    manifest = store.read_manifest(max(store.steps()))
    assert manifest.step == STEPS
    return {name: entry.chunks for name, entry in manifest.tensors.items()}


def start(run_dir):
    return subprocess.Popen([sys.executable, "-m", "stablediff", *ARGS, "--run-dir", str(run_dir)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = run_cli(*ARGS, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    return final_hashes(run_dir)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    rng = random.Random(1234)
    kills, resumed_steps = 0, []
    while kills < 3:
        proc = start(run_dir)
        time.sleep(rng.uniform(4.0, 12.0))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        output = proc.communicate()[0]
        kills += 1
        resumed_steps += [line for line in output.splitlines() if line.startswith("resumed from step")]
    result = run_cli(*ARGS, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert kills >= 1
    assert final_hashes(run_dir) == uninterrupted


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_0_then_continues(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    args = [a.replace(f"max_steps={STEPS}", "max_steps=100000") for a in ARGS]
    args = [a.replace("every_steps=1", "every_steps=100000") for a in args]
    proc = subprocess.Popen([sys.executable, "-m", "stablediff", *args, "--run-dir", str(run_dir)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("stage 2"):
            break
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    saved = [line for line in output.splitlines() if "saved a checkpoint at step" in line]
    assert saved, output
    step = int(saved[-1].split("at step ")[1].split(";")[0])
    assert step > 0
    assert max(CheckpointStore(run_dir / "checkpoints").steps()) == step
    again = run_cli(*ARGS[:3], f"train.max_steps={step + 2}", "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stderr
    assert f"resumed from step {step}" in again.stderr
