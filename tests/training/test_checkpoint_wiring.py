"""Checkpoints as a training run uses them: incremental bytes, failing replicas, repair."""

import shutil
import signal
import subprocess
import sys
import time

from stablediff.checkpoint import CheckpointStore
from tests.conftest import REPO, run_cli

BASE = ["train", "tiny", "--set", "train.threads=1", "--set", "checkpoint.every_steps=1"]


def test_frozen_vae_costs_no_bytes_after_the_first_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(*BASE, "--set", "train.max_steps=3", "--run-dir", str(run_dir)).returncode == 0
    store = CheckpointStore(run_dir / "checkpoints")
    first, *later = [store.read_manifest(s) for s in store.steps()]
    vae_chunks = {c for name, e in first.tensors.items() if name.startswith("vae/") for c in e.chunks}
    vae_bytes = sum(e.nbytes for name, e in first.tensors.items() if name.startswith("vae/"))
    for manifest in later:
        assert {c for n, e in manifest.tensors.items() if n.startswith("vae/") for c in e.chunks} == vae_chunks
        assert manifest.bytes_new <= manifest.bytes_total - vae_bytes


def wait_for(condition, proc, what: str, timeout: float = 300) -> None:
    """Poll `condition` (cheap filesystem checks) until it holds; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}:\n{proc.communicate()[0]}"
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(0.05)


def test_a_replica_that_disappears_mid_run_does_not_stop_training_and_repair_resyncs_it(tmp_path):
    """The run is paused (SIGSTOP) once the replica holds a checkpoint, the replica is replaced by a file
    (every write below it fails with ENOTDIR), and the run continues: no race with the writer thread, and
    the step-6 save, still ahead, must meet the missing replica."""
    run_dir, replica, max_steps = tmp_path / "run", tmp_path / "replica", 6
    args = [*BASE, "--set", f"train.max_steps={max_steps}", "--set", f"checkpoint.replicas=[{replica}]",
            "--run-dir", str(run_dir)]
    proc = subprocess.Popen([sys.executable, "-m", "stablediff", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: CheckpointStore(replica).steps(), proc, "the replica received a checkpoint")
        proc.send_signal(signal.SIGSTOP)
        assert max_steps not in CheckpointStore(run_dir / "checkpoints").steps()  # saves still to come
        shutil.rmtree(replica)
        replica.write_text("the mount is gone")
    finally:
        proc.send_signal(signal.SIGCONT)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert f"replica {replica} is behind" in output
    assert max(CheckpointStore(run_dir / "checkpoints").steps()) == max_steps

    replica.unlink()
    result = run_cli("ckpt", "repair", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert CheckpointStore(replica).steps() == CheckpointStore(run_dir / "checkpoints").steps()
    assert CheckpointStore(replica).verify(deep=True).ok


def test_a_corrupt_newest_checkpoint_is_skipped_with_its_reason_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(*BASE, "--set", "train.max_steps=3", "--run-dir", str(run_dir)).returncode == 0
    store = CheckpointStore(run_dir / "checkpoints")
    newest, previous = store.read_manifest(3), store.read_manifest(2)
    only_newest = next(e.chunks[0] for n, e in newest.tensors.items()
                       if n.startswith("unet/") and e.chunks[0] not in
                       {c for pe in previous.tensors.values() for c in pe.chunks})
    chunk = run_dir / "checkpoints" / "objects" / only_newest[:2] / only_newest
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0x40
    chunk.write_bytes(bytes(data))
    result = run_cli(*BASE, "--set", "train.max_steps=4", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert "skipped step 3" in result.stderr
    assert "resumed from step 2" in result.stderr
