"""The training engine as a user runs it: torchrun, divergence rollback, validation, options."""

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
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow
QUIET = ["--set", "train.threads=1", "--set", "train.tensorboard=false"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def unet_chunks(run_dir: Path) -> dict[str, list[str]]:
    store = CheckpointStore(run_dir / "checkpoints")
    manifest = store.read_manifest(max(store.steps()))
    return {name: entry.chunks for name, entry in manifest.tensors.items() if name.startswith(("unet/", "ema/"))}


def process_tree(root: int) -> list[int]:
    """root and all its descendants (torchrun starts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def test_two_torchrun_ranks_train_get_killed_and_one_process_resumes(tmp_path):
    run_dir = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "stablediff", "train",
              "tiny", "--run-dir", str(run_dir), *QUIET, "--set", "train.max_steps=200",
              "--set", "checkpoint.every_steps=2"]
    proc = subprocess.Popen(launch, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    store = CheckpointStore(run_dir / "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "checkpoints" / "manifests").is_dir() and max(store.steps(), default=0) >= 4:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    for pid in process_tree(proc.pid):  # the launcher and both ranks, mid-run
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(store.steps())
    saved = store.read_manifest(killed_at).meta
    assert saved["images_seen"] == killed_at * 8 * 2  # both ranks' samples counted

    result = run_cli("train", "tiny", "--run-dir", str(run_dir), *QUIET, "--set", f"train.max_steps={killed_at + 4}",
                     "--set", "checkpoint.every_steps=2")
    assert result.returncode == 0, result.stderr
    assert f"resumed from step {killed_at}" in result.stderr
    final = store.read_manifest(max(store.steps())).meta
    assert final["step"] == killed_at + 4
    assert final["images_seen"] == killed_at * 16 + 4 * 8
    # the global sample position moved on by exactly what the single process read
    epoch_size = 64
    before = saved["sampler"]["epoch"] * epoch_size + saved["sampler"]["position"]
    after = final["sampler"]["epoch"] * epoch_size + final["sampler"]["position"]
    assert after - before == 4 * 8


def test_a_diverging_run_skips_bad_steps_rolls_back_lowers_the_lr_then_stops_with_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", "tiny", "--run-dir", str(run_dir), *QUIET, "--set", "train.learning_rate=1e4",
                     "--set", "train.grad_clip=null", "--set", "train.warmup_steps=0", "--set", "train.max_steps=30",
                     "--set", "checkpoint.every_steps=1", "--set", "guard.min_history=2", "--set", "guard.max_events=2",
                     "--set", "guard.within_steps=10", "--set", "guard.max_rollbacks=2")
    assert result.returncode == 1
    assert "diverged again" in result.stderr and "Traceback" not in result.stderr
    records = metrics(run_dir)
    assert any(r.get("skipped") == "nan_loss" for r in records)
    rollbacks = [r for r in records if r.get("event") == "rollback"]
    assert [r["lr_scale"] for r in rollbacks] == [0.5, 0.25]
    assert "rolled back to step" in result.stderr
    assert CheckpointStore(run_dir / "checkpoints").verify().ok  # nothing torn on the way out


def test_validation_and_sample_grids_do_not_change_what_training_computes(tmp_path):
    plain, observed = tmp_path / "plain", tmp_path / "observed"
    # the two runs are independent processes of one thread each: side by side, on two cores
    plain_proc = subprocess.Popen([sys.executable, "-m", "stablediff", "train", "tiny", "--run-dir", str(plain),
                                   *QUIET], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = run_cli("train", "tiny", "--run-dir", str(observed), *QUIET, "--set", "train.validate_every=1",
                     "--set", "sample.every_steps=2")
    plain_output = plain_proc.communicate(timeout=600)[0]
    assert plain_proc.returncode == 0, plain_output
    assert result.returncode == 0, result.stderr
    assert unet_chunks(observed) == unet_chunks(plain)
    val = [r["val_loss"] for r in metrics(observed) if "val_loss" in r]
    assert len(val) == 4 and all(v > 0 for v in val)
    assert (observed / "samples" / "step-0000002.png").is_file()
    listed = CheckpointStore(observed / "checkpoints").list()
    assert all("val_loss" in s.metrics for s in listed if s.step > 0)


@pytest.mark.parametrize("options", [
    ["train.mixed_precision=bf16", "train.gradient_accumulation_steps=2", "train.channels_last=true"],
    ["train.mixed_precision=fp16", "train.gradient_checkpointing=true", "train.loss_weighting=min_snr",
     "train.noise_offset=0.05", "train.timestep_sampling=logit_normal"],
    ["train.prediction_type=v_prediction", "noise.rescale_zero_terminal_snr=true",
     "noise.beta_schedule=squaredcos_cap_v2", "train.ema_half_life_images=500"],
    ["vae.enabled=false", "train.prediction_type=sample"],
], ids=["bf16-accumulation", "fp16-checkpointing-minsnr", "vpred-ztsnr-cosine", "pixel-space-x0"])
def test_training_options_run_end_to_end_with_a_finite_loss(tmp_path, options):
    run_dir = tmp_path / "run"
    sets = [arg for option in options for arg in ("--set", option)]
    result = run_cli("train", "tiny", "--run-dir", str(run_dir), *QUIET, *sets)
    assert result.returncode == 0, result.stderr
    losses = [r["loss"] for r in metrics(run_dir) if r.get("stage") == "unet" and "loss" in r]
    assert losses and all(loss == loss and loss < 10 for loss in losses)
    if "vae.enabled=false" in options:  # no VAE: the UNet and scheduler alone, and samples
        assert (run_dir / "export" / "pixel" / "unet" / "config.json").is_file()
    else:
        assert (run_dir / "export" / "diffusers" / "model_index.json").is_file()
    assert (run_dir / "samples" / "final.png").is_file()


def test_tensorboard_events_are_written_next_to_metrics(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli("train", "tiny", "--run-dir", str(run_dir), "--set", "train.threads=1").returncode == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert "unet/loss" in events.Tags()["scalars"]


def test_early_stopping_under_torchrun_stops_every_rank_on_rank_zeros_validation_loss(tmp_path):
    # Validation runs on rank 0 only; without its number shared, rank 0 would stop and rank 1 would wait forever.
    run_dir = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "stablediff", "train",
              "tiny", "--run-dir", str(run_dir), *QUIET, "--set", "train.max_steps=40",
              "--set", "train.validate_every=2", "--set", "early_stopping.patience=1",
              "--set", "early_stopping.min_delta=1000"]  # nothing improves by 1000: the second evaluation stops
    result = subprocess.run(launch, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1",
                                 "PYTHONFAULTHANDLER": "1"})  # an abort prints every thread's stack
    assert result.returncode == 0, result.stderr[-3000:]
    store = CheckpointStore(run_dir / "checkpoints")
    assert max(store.steps()) == 4
    stops = [r for r in metrics(run_dir) if r.get("event") == "early_stopping"]
    assert [r["step"] for r in stops] == [4] and stops[0]["best_step"] == 2
    assert json.loads((run_dir / "eval.json").read_text())["best"]["step"] == 2
