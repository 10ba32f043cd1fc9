"""SIGTERM/SIGINT in every stage of a real `stablediff train` (and `demo`): stop at a safe point, exit 0, lose nothing.

The signals are sent on a line the run prints (or a file it writes), so each lands in the
stage it is meant for; stage 1 is long enough (60 steps) that it is still running then.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stablediff.checkpoint import CheckpointStore
from stablediff.training.interrupt import STOP, TrainingInterrupted
from tests.conftest import REPO, run_cli

ARGS = ["train", "tiny", "--set", "train.threads=1", "--set", "train.tensorboard=false",
        "--set", "vae.train_steps=60", "--set", "train.max_steps=4"]


def final_chunks(run_dir: Path) -> dict[str, tuple[str, ...]]:
    store = CheckpointStore(run_dir / "checkpoints")
    manifest = store.read_manifest(max(store.steps()))
    assert manifest.step == 4
    return {name: entry.chunks for name, entry in manifest.tensors.items()}


def signal_when(args: list[str], sig: int, line_starts: str | None = None, file: Path | None = None) -> tuple[int, str]:
    """Run `stablediff ARGS`, send `sig` when stderr shows a line starting with `line_starts` (or when
    `file` is non-empty); returns (exit status, everything it printed)."""
    proc = subprocess.Popen([sys.executable, "-m", "stablediff", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = []
    if file is not None:
        deadline = time.monotonic() + 300
        while not (file.is_file() and file.stat().st_size) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(sig)
    else:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(line_starts):
                proc.send_signal(sig)
                break
    rest = proc.communicate(timeout=300)[0]
    return proc.returncode, "".join(seen) + rest


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = run_cli(*ARGS, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    return final_chunks(run_dir)


def test_the_stop_flag_is_set_by_sigterm_and_the_handlers_are_restored_afterwards():
    before = signal.getsignal(signal.SIGTERM)
    with STOP.handling(say=lambda message: None):
        with STOP.handling():  # nested (demo around run_training): one set of handlers
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs in the main thread at the next bytecode
            with pytest.raises(TrainingInterrupted, match="^SIGTERM: stopped here; all kept; run the same"):
                STOP.check("here", "all kept")
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    assert STOP.signal_name is None
    STOP.check("anywhere", "nothing")  # no signal since: no stop


@pytest.mark.slow
def test_sigterm_in_stage_1_saves_it_exits_0_and_the_resumed_run_ends_bitwise_equal(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    status, output = signal_when([*ARGS, "--run-dir", str(run_dir)], signal.SIGTERM, line_starts="stage 1")
    assert status == 0, output
    assert "Traceback" not in output
    saved = [line for line in output.splitlines() if line.startswith("SIGTERM: saved a checkpoint of stage 1")]
    assert saved, output
    meta = CheckpointStore(run_dir / "checkpoints").read_manifest(0).meta
    assert meta["stage"] == "vae" and 0 < meta["vae_step"] < 60
    assert f"at its step {meta['vae_step']};" in saved[0]
    cache = run_cli("data", "cache", *ARGS[1:], "--run-dir", str(run_dir))  # no half-trained VAE to encode with
    assert cache.returncode == 1 and f"stage 1 stopped at step {meta['vae_step']} of 60" in cache.stderr

    resumed = run_cli(*ARGS, "--run-dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed stage 1 (autoencoder) from its step {meta['vae_step']}" in resumed.stderr
    assert final_chunks(run_dir) == uninterrupted


@pytest.mark.slow
def test_sigterm_while_encoding_features_exits_0_and_stage_1_is_not_trained_again(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    status, output = signal_when([*ARGS, "--run-dir", str(run_dir)], signal.SIGTERM,
                                 line_starts="autoencoder held-out reconstruction")
    assert status == 0, output
    assert "Traceback" not in output
    assert "SIGTERM: stopped while encoding features" in output
    meta = CheckpointStore(run_dir / "checkpoints").read_manifest(0).meta
    assert meta["stage"] == "vae" and meta["vae_report"]["steps"] == 60  # finished, with its report

    resumed = run_cli(*ARGS, "--run-dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "stage 1: autoencoder" not in resumed.stderr and "vae: step" not in resumed.stderr
    assert "resumed after stage 1" in resumed.stderr
    assert final_chunks(run_dir) == uninterrupted


@pytest.mark.slow
def test_sigint_while_reading_a_folder_stops_there_and_exits_0(tmp_path):
    source = tmp_path / "data"
    source.mkdir()
    (source / "a-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")  # sorts first: quarantined at once
    (source / "a-broken.txt").write_text("broken")
    pixels = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    for i in range(1500):  # enough that reading them is still going on when the signal lands
        Image.fromarray(np.roll(pixels, i)).save(source / f"img{i:05d}.png")
        (source / f"img{i:05d}.txt").write_text(f"a noisy picture number {i}")
    run_dir = tmp_path / "run"
    status, output = signal_when([*ARGS, "--set", f"data.source={source}", "--set", "data.limit=null",
                                  "--run-dir", str(run_dir)], signal.SIGINT, file=run_dir / "quarantine.jsonl")
    assert status == 0, output
    assert "SIGINT: stopped while reading the data; nothing needed saving yet" in output
    assert "aborted" not in output and "Traceback" not in output


@pytest.mark.slow
def test_a_failing_emergency_save_exits_143_with_the_reason(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "stablediff", *ARGS, "--run-dir", str(run_dir)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("stage 1"):
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            (run_dir / "checkpoints").write_text("the disk is gone")  # every store write below it fails
            proc.send_signal(signal.SIGTERM)
            break
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, output
    assert "SIGTERM: the emergency checkpoint of stage 1 at its step" in output and "could not be written" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_demo_on_sigterm_exits_0_with_the_one_line_message_and_no_traceback(tmp_path):
    status, output = signal_when(["demo", "--run-dir", str(tmp_path / "run"), "--set", "train.threads=1"],
                                 signal.SIGTERM, line_starts="stage 1")
    assert status == 0, output
    assert "SIGTERM: saved a checkpoint of stage 1 (autoencoder)" in output
    assert "Traceback" not in output and "TrainingInterrupted" not in output
