"""Replicas never stop training; sync copies what is missing; repair heals both sides."""

from __future__ import annotations

import os

import numpy as np

from stablediff.checkpoint import AsyncCheckpointer, CheckpointStore, RetentionPolicy, repair, sync

from .conftest import CHUNK, first_chunk_path
from .faults import full_disk_fs


def _state(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {"frozen": np.random.default_rng(0).random(800, np.float32), "w": rng.random(500, np.float32)}


def _file_in_the_way(tmp_path) -> CheckpointStore:
    """A replica whose parent path is a file: like a mount point that is not mounted."""
    (tmp_path / "mnt").write_text("not a directory")
    return CheckpointStore(tmp_path / "mnt" / "replica", chunk_bytes=CHUNK)


def test_sync_copies_missing_checkpoints_in_commit_order(store, replica):
    for step in (1, 2, 3):
        store.save(step, _state(step))
    replica_first = sync(store, replica)
    assert replica_first.steps_copied == [1, 2, 3] and replica_first.ok
    assert sync(store, replica).steps_copied == []  # nothing left to do
    assert replica.verify(deep=True).ok
    assert replica.read_manifest_bytes(3) == store.read_manifest_bytes(3)


def test_sync_replaces_a_checkpoint_the_source_saved_again_at_the_same_step(store, replica):
    # stage 1 of a run is saved as step 0 again and again, then replaced by stage 2's step 0
    store.save(0, _state(0), meta={"stage": "vae"})
    sync(store, replica)
    store.save(0, _state(7), meta={"stage": "unet"})
    assert sync(store, replica).steps_copied == [0]
    assert replica.read_manifest_bytes(0) == store.read_manifest_bytes(0)
    assert replica.load(0).meta["stage"] == "unet"
    assert sync(store, replica).steps_copied == []  # the same bytes are not written again


def test_sync_does_not_propagate_a_damaged_checkpoint(store, replica):
    store.save(1, _state(1))
    store.save(2, _state(2))
    with open(first_chunk_path(store, "w", 2), "r+b") as f:
        f.write(b"\0\0\0\0")
    report = sync(store, replica)
    assert replica.steps() == [1]
    assert "step 2 not copied" in report.problems[0] and "corrupt" in report.problems[0]


def test_a_damaged_replica_chunk_that_a_new_checkpoint_shares_is_rewritten_not_trusted(store, replica):
    store.save(1, _state(1))
    sync(store, replica)
    with open(first_chunk_path(replica, "frozen", 1), "r+b") as f:  # same size, one flipped word
        f.write(b"\xff\xff\xff\xff")
    store.save(2, _state(2))  # shares the frozen chunk
    later = CheckpointStore(replica.location, chunk_bytes=CHUNK)  # a new process: it knows no chunk yet
    report = sync(store, later)
    assert report.steps_copied == [2] and report.chunks_healed == 1
    assert later.verify(deep=True).ok  # step 1 too: it shares the rewritten chunk
    assert sync(store, later).chunks_healed == 0  # checked once per process


def test_unwritable_replica_does_not_stop_saves(store, tmp_path):
    broken = _file_in_the_way(tmp_path)
    messages: list[str] = []
    with AsyncCheckpointer(store, [broken], log=messages.append) as ckpt:
        ckpt.snapshot_and_save(1, _state(1))
        ckpt.snapshot_and_save(2, _state(2))
    assert store.steps() == [1, 2]
    assert broken.location in ckpt.behind
    assert ckpt.stats[-1].replicas_behind == [broken.location]
    assert any("is behind" in m and "retried at the next save" in m for m in messages)


def test_replica_that_comes_back_catches_up_at_the_next_save(store, tmp_path):
    broken = _file_in_the_way(tmp_path)
    messages: list[str] = []
    with AsyncCheckpointer(store, [broken], log=messages.append) as ckpt:
        ckpt.snapshot_and_save(1, _state(1))
        ckpt.wait()
        os.remove(tmp_path / "mnt")  # the mount is back
        ckpt.snapshot_and_save(2, _state(2))
    assert broken.steps() == [1, 2] and ckpt.behind == {}
    assert broken.verify(deep=True).ok
    assert any("caught up" in m for m in messages)


def test_full_replica_disk_is_reported_and_repair_resyncs_it(store):
    fs = full_disk_fs(budget=3000)  # room for a few chunks, not a whole checkpoint
    full = CheckpointStore("/replica", fs=fs, chunk_bytes=CHUNK)
    with AsyncCheckpointer(store, [full], retention=RetentionPolicy(keep_last=2)) as ckpt:
        for step in (1, 2, 3):
            ckpt.snapshot_and_save(step, _state(step))
    assert store.steps() == [2, 3]
    assert "No space left" in ckpt.behind[full.location]
    assert full.steps() == []  # never committed a torn checkpoint
    fs.budget = None  # space was freed
    report = repair(store, [full])
    assert report.ok, report.lines()
    assert full.steps() == [2, 3] and full.verify(deep=True).ok


def test_repair_restores_the_primary_from_a_replica(store, replica):
    for step in (1, 2):
        store.save(step, _state(step))
    sync(store, replica)
    os.remove(first_chunk_path(store, "frozen", 1))
    with open(first_chunk_path(store, "w", 2), "r+b") as f:
        f.write(b"rot!")
    with open(os.path.join(store.location, store.manifest_rel(1)), "wb") as f:
        f.write(b"{torn")
    report = repair(store, [replica])
    assert report.ok, report.lines()
    assert len(report.fixed) == 3
    assert store.verify(deep=True).ok
    assert store.load().skipped == []


def test_repair_resyncs_a_replica_from_the_primary(store, replica):
    store.save(1, _state(1))
    sync(store, replica)
    store.save(2, _state(2))
    with open(first_chunk_path(replica, "w", 1), "r+b") as f:
        f.write(b"rot!")
    report = repair(store, [replica])
    assert report.ok and report.syncs[0].steps_copied == [2] and report.syncs[0].chunks_copied >= 1
    assert replica.verify(deep=True).ok


def test_repair_says_what_it_could_not_fix(store, replica):
    store.save(1, _state(1))
    os.remove(first_chunk_path(store, "w", 1))
    report = repair(store, [replica])
    assert not report.ok
    assert "no replica has a good copy" in report.unfixable[0]
    assert any(line.startswith("NOT fixed") for line in report.lines())
