"""Real `stablediff train` processes heal damaged chunks that a resumed run reuses.

Each test copies one trained run (steps 0, 2, 4), damages a chunk, runs `train`
again and checks with `ckpt verify` (which re-hashes) that the store is whole.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_cli

TRAIN = ["train", "tiny", "--set", "checkpoint.every_steps=2", "--set", "train.threads=1"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("heal") / "run"
    result = run_cli(*TRAIN, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture
def run_copy(saved_run, tmp_path):
    shutil.copytree(saved_run, tmp_path / "run")
    return tmp_path / "run"


def _chunks(run_dir, step: int, prefix: str = "") -> list[str]:
    manifest = json.loads((run_dir / "checkpoints" / "manifests" / f"{step:012d}.json").read_text())
    return [h for name, t in manifest["tensors"].items() if name.startswith(prefix) for h in t["chunks"]]


def _flip_a_bit(run_dir, digest: str) -> None:
    path = run_dir / "checkpoints" / "objects" / digest[:2] / digest
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_resume_past_a_corrupt_chunk_heals_it_instead_of_referencing_it_again(run_copy):
    digest = sorted(set(_chunks(run_copy, 4, "unet/")) - set(_chunks(run_copy, 2)))[0]
    _flip_a_bit(run_copy, digest)
    result = run_cli(*TRAIN, "--run-dir", str(run_copy))
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "skipped step 4" in out and "resumed from step 2" in out
    assert digest in _chunks(run_copy, 4)  # the resumed run computed the same bytes again...
    assert "healed 1 damaged chunk" in out  # ...and rewrote the chunk instead of trusting its size
    verified = run_cli("ckpt", "verify", str(run_copy))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_flipped_bit_in_the_shared_vae_is_healed_by_the_next_save(run_copy, tmp_path):
    replica = tmp_path / "replica"
    assert run_cli("ckpt", "repair", str(run_copy), "--replica", str(replica)).returncode == 0  # seeds it
    digest = _chunks(run_copy, 4, "vae/")[0]
    assert all(digest in _chunks(run_copy, step) for step in (0, 2, 4))  # every checkpoint needs it
    _flip_a_bit(run_copy, digest)
    result = run_cli(*TRAIN, "--run-dir", str(run_copy), "--set", f"checkpoint.replicas=[{replica}]",
                     "--set", "train.max_steps=6")
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "resumed from step 4" in out and "healed 1 damaged chunk" in out
    verified = run_cli("ckpt", "verify", str(run_copy))  # the primary alone: every step whole again
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "0 damaged" in verified.stdout and _chunks(run_copy, 6, "vae/")[0] == digest  # keep_last 3: 2, 4, 6
