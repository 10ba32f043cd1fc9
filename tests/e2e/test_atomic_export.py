"""Exports are atomic and honest: real `stablediff` processes, SIGKILLed mid-export or out of disk.

A kill is placed at an exact instant by tests/e2e/_kill_during.py (the process SIGKILLs itself just
before a chosen call). A full disk is the kernel's own refusal to write: RLIMIT_FSIZE makes every
write past the limit fail (EFBIG), as ENOSPC does on a full disk, with no root and no mount needed.
"""

from __future__ import annotations

import hashlib
import json
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from stablediff.checkpoint import CheckpointStore
from tests.conftest import REPO, run_cli

KILL = str(Path(__file__).with_name("_kill_during.py"))
WRITE_LIMIT = 30 * 2**20  # above any checkpoint chunk, below the 87 MiB text encoder of an export


def run_killed(function: str, match: str, nth: int, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, KILL, function, match, str(nth), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == -9, f"not killed (exit {result.returncode}): {result.stderr[-2000:]}"
    return result


def run_out_of_disk(*args: str) -> subprocess.CompletedProcess:
    def limit_writes():
        resource.setrlimit(resource.RLIMIT_FSIZE, (WRITE_LIMIT, WRITE_LIMIT))

    return subprocess.run([sys.executable, "-m", "stablediff", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, preexec_fn=limit_writes)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_write_error(result, out: Path):
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "SafetensorError" not in result.stderr, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: could not write {out}: File too large (errno 27). Nothing was replaced"), error


@pytest.fixture(scope="module")
def killed_single_file(tiny_run, tmp_path_factory):
    """A single-file export SIGKILLed after its bytes are fsynced, just before the rename; then run again."""
    folder = tmp_path_factory.mktemp("single")
    out = folder / "model.safetensors"
    args = ("ckpt", "export", str(tiny_run), "--format", "single-file", "--out", str(out))
    run_killed("os.replace", out.name, 1, *args)
    after_kill = sorted(p.name for p in folder.iterdir())
    rerun = run_cli(*args)
    return out, after_kill, rerun


def test_sigkill_before_the_rename_leaves_no_single_file_that_loads(killed_single_file):
    out, after_kill, _ = killed_single_file
    assert out.name not in after_kill and not any(name.endswith(".safetensors") for name in after_kill)
    assert len(after_kill) == 1 and after_kill[0].startswith(out.name + ".tmp-")  # the temp, complete but unnamed


def test_the_rerun_of_a_killed_single_file_export_succeeds_and_removes_the_leftover(killed_single_file):
    out, after_kill, rerun = killed_single_file
    assert rerun.returncode == 0, rerun.stderr
    assert f"removed {out.parent / after_kill[0]}" in rerun.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name] and load_file(out)


def test_a_single_file_export_embeds_no_local_paths(killed_single_file, tiny_run):
    out, _, _ = killed_single_file
    with safe_open(out, "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["stablediff.run"]) == {"step": max(CheckpointStore(tiny_run / "checkpoints").steps()),
                                                      "weights": "ema", "run": tiny_run.name}
    text = json.dumps(metadata)
    for local in (str(tiny_run.parent), sys.prefix, str(REPO)):
        assert local not in text, local
    assert "_name_or_path" not in text


@pytest.fixture(scope="module")
def killed_diffusers(tiny_run, tmp_path_factory):
    """A diffusers export SIGKILLed after its first weights file, then the same command again."""
    folder = tmp_path_factory.mktemp("diffusers")
    out = folder / "model"
    args = ("ckpt", "export", str(tiny_run), "--format", "diffusers", "--out", str(out))
    run_killed("safetensors.torch.save_file", "", 2, *args)
    after_kill = sorted(p.name for p in folder.iterdir())
    rerun = run_cli(*args)
    return out, after_kill, rerun


def test_sigkill_during_a_diffusers_export_leaves_no_folder_at_out(killed_diffusers):
    out, after_kill, _ = killed_diffusers
    assert len(after_kill) == 1 and after_kill[0].startswith(out.name + ".tmp-"), after_kill


def test_the_rerun_of_a_killed_diffusers_export_recognises_its_partial_output(killed_diffusers, tiny_run):
    out, after_kill, rerun = killed_diffusers
    assert rerun.returncode == 0, rerun.stderr  # not "already exists; pass --force"
    assert f"removed {out.parent / after_kill[0]}, the partial output of an interrupted write" in rerun.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    weights = "unet/diffusion_pytorch_model.safetensors"
    ours, final = load_file(out / weights), load_file(tiny_run / "export" / "diffusers" / weights)
    assert sorted(ours) == sorted(final) and all((ours[k] == final[k]).all() for k in ours)


def test_a_diffusers_export_embeds_no_local_paths(killed_diffusers, tiny_run):
    out, _, _ = killed_diffusers
    text = "".join(p.read_text() for p in out.rglob("*.json"))
    for local in (str(tiny_run.parent), sys.prefix, str(REPO)):
        assert local not in text, local
    assert "_name_or_path" not in text


def test_force_killed_halfway_keeps_the_old_folder_whole(killed_diffusers, tiny_run, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(killed_diffusers[0], out)
    before = tree_digest(out)
    # killed once every weights file is written (the UNet last of them), before the scheduler's config
    run_killed("builtins.open", "scheduler_config.json", 1, "ckpt", "export", str(tiny_run), "--format", "diffusers",
               "--step", "0", "--no-ema", "--out", str(out), "--force")
    assert tree_digest(out) == before  # not the new UNet next to the old rest
    assert json.loads((out / "stablediff_export.json").read_text())["weights"] == "ema"


def test_a_full_disk_during_a_single_file_export_is_a_one_paragraph_error(tiny_run, tmp_path):
    out = tmp_path / "model.safetensors"
    result = run_out_of_disk("ckpt", "export", str(tiny_run), "--format", "single-file", "--out", str(out))
    assert_write_error(result, out)
    assert list(tmp_path.iterdir()) == []  # the temp file is gone too


def test_export_of_a_run_whose_newest_checkpoint_is_damaged_names_the_step_it_wrote(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export", "features", "samples"))
    store = CheckpointStore(run / "checkpoints")
    steps = store.steps()
    older = {c for s in steps[:-1] for e in store.read_manifest(s).tensors.values() for c in e.chunks}
    own = next(c for e in store.read_manifest(steps[-1]).tensors.values() for c in e.chunks if c not in older)
    chunk = run / "checkpoints" / store.object_rel(own)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    out = tmp_path / "model.safetensors"
    result = run_cli("ckpt", "export", str(run), "--format", "single-file", "--out", str(out))
    assert result.returncode == 0, result.stderr
    wrote = next(line for line in result.stdout.splitlines() if line.startswith("wrote"))
    assert re.search(rf"from step {steps[-2]}, NOT the newest: step {steps[-1]} cannot be loaded \(.+\)", wrote), wrote


def test_a_full_disk_at_the_final_export_is_clear_and_generate_does_not_serve_the_stale_export(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    export = run / "export" / "diffusers"
    old = tree_digest(export)
    first_end = max(CheckpointStore(run / "checkpoints").steps())
    result = run_out_of_disk("train", "tiny", "--run-dir", str(run), "--set", f"train.max_steps={first_end + 2}",
                             "--set", "train.threads=1")
    assert_write_error(result, export)
    assert f"{export} is as it was" in result.stderr
    assert max(CheckpointStore(run / "checkpoints").steps()) == first_end + 2  # the training itself is saved
    assert tree_digest(export) == old and sorted(p.name for p in export.parent.iterdir()) == ["diffusers"]

    made = run_cli("generate", str(run), "a handwritten digit seven", "--steps", "2", "--out", str(tmp_path / "png"))
    assert made.returncode == 0, made.stderr
    assert (f"note: {export.resolve()} holds step {first_end}, older than the run's newest checkpoint "
            f"(step {first_end + 2}), so that checkpoint is used instead") in made.stderr
    png = next((tmp_path / "png").glob("*.png"))
    from PIL import Image

    stale_hash = hashlib.sha256((export / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert f"Model hash: {stale_hash[:10]}" not in Image.open(png).text["parameters"]
