"""Resume checks what it resumes into; a resumed run's files read as if it had never stopped."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stablediff.checkpoint import CheckpointStore
from tests.conftest import REPO, run_cli
from tests.data.corpus import build_mixed_aspect_folder

pytestmark = pytest.mark.slow
BASE = ["train", "tiny", "--set", "train.threads=1", "--set", "train.tensorboard=false",
        "--set", "checkpoint.every_steps=2"]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file of the run outside the feature cache, with its mtime and size; not `.lock`, which
    each command that writes the run rewrites to name itself as the holder."""
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in run_dir.rglob("*") if p.is_file() and "features" not in p.parts and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    result = run_cli(*BASE, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    return run_dir


def test_a_changed_data_source_and_unet_key_are_refused_with_the_diff_and_nothing_is_touched(finished_run,
                                                                                            tmp_path):
    before = snapshot(finished_run)
    result = run_cli(*BASE, "--run-dir", str(finished_run), "--set", f"data.source={tmp_path}",
                     "--set", "unet.block_out_channels=[16, 64]")
    assert result.returncode == 1, result.stderr
    assert f"data.source: builtin:digits -> {tmp_path}" in result.stderr
    assert "unet.block_out_channels: [16, 32] -> [16, 64]" in result.stderr
    assert "--allow-config-change" in result.stderr and "Traceback" not in result.stderr
    assert "resumed from step" not in result.stderr
    assert snapshot(finished_run) == before


def test_a_finished_run_says_it_is_complete_and_exports_nothing_again(finished_run):
    before = snapshot(finished_run)
    result = run_cli(*BASE, "--run-dir", str(finished_run))
    assert result.returncode == 0, result.stderr
    assert "run already complete at step 4" in result.stdout
    assert "final loss" not in result.stdout
    assert snapshot(finished_run) == before  # no export, sample grid, metrics line or config rewritten


def test_allow_config_change_continues_on_other_data_and_records_the_change(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    source = build_mixed_aspect_folder(tmp_path / "photos", copies=1)
    changed = ["--set", f"data.source={source}", "--set", "unet.attention_head_dim=8", "--set", "train.max_steps=6"]
    result = run_cli(*BASE, "--run-dir", str(run_dir), *changed, "--allow-config-change")
    assert result.returncode == 0, result.stderr
    assert "resumed from step 4" in result.stderr
    assert "continuing at the start of epoch" in result.stderr  # the saved data order means nothing here
    (event,) = [r for r in records(run_dir / "metrics.jsonl") if r.get("event") == "config_changed"]
    assert event["step"] == 4
    assert set(event["allowed"]) == {"data.source", "unet.attention_head_dim", "fingerprints.data"}
    store = CheckpointStore(run_dir / "checkpoints")
    assert store.read_manifest(6).meta["config_changes"] == [{"step": 4, "changes": event["changes"]}]
    assert yaml.safe_load((run_dir / "configs" / "step-0.yaml").read_text())["data"]["source"] == "builtin:digits"
    current = (run_dir / "config.yaml").read_text()
    assert "in effect from step 4" in current and yaml.safe_load(current)["data"]["source"] == source


def logged_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return [r["step"] for r in map(json.loads, lines[:-1]) if r.get("stage") == "unet" and "loss" in r]


def kill_past_a_checkpoint(args: list[str], run_dir: Path) -> int:
    """Start the run and SIGKILL it once it has logged steps after a checkpoint at step >= 10."""
    proc = subprocess.Popen([sys.executable, "-m", "stablediff", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    store, deadline = CheckpointStore(run_dir / "checkpoints"), time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        saved = max(store.steps(), default=0) if (run_dir / "checkpoints" / "manifests").is_dir() else 0
        if saved >= 10 and max(logged_steps(run_dir), default=0) > saved:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return max(store.steps())


def test_after_sigkill_and_resume_each_step_is_logged_once_and_each_reject_quarantined_once(tmp_path):
    source = Path(build_mixed_aspect_folder(tmp_path / "data", copies=2))
    (source / "empty.png").write_bytes(b"")
    (source / "empty.txt").write_text("an empty file")
    (source / "text.png").write_bytes(b"not an image\n" * 8)
    (source / "text.txt").write_text("a text file")
    run_dir = tmp_path / "run"
    args = [*BASE, "--run-dir", str(run_dir), "--set", f"data.source={source}", "--set", "data.max_reject_fraction=0.5",
            "--set", "train.log_every=1", "--set", "checkpoint.every_steps=10", "--set", "train.max_steps=100000"]
    killed_at = kill_past_a_checkpoint(args, run_dir)
    assert max(logged_steps(run_dir)) > killed_at  # steps the resume will do again were logged
    final = killed_at + 3
    result = run_cli(*args, "--set", f"train.max_steps={final}")
    assert result.returncode == 0, result.stderr
    assert f"resumed from step {killed_at}" in result.stderr
    log = records(run_dir / "metrics.jsonl")
    assert [r["step"] for r in log if r.get("stage") == "unet" and "loss" in r] == list(range(1, final + 1))
    vae_steps = [r["step"] for r in log if r.get("stage") == "vae" and "step" in r]
    assert len(vae_steps) == len(set(vae_steps)) > 0
    rejects = records(run_dir / "quarantine.jsonl")
    assert sorted(r["key"] for r in rejects) == ["empty", "text"]
