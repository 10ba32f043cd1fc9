"""The known-good guard: retention never deletes the last good checkpoint because newer manifests parse."""

from __future__ import annotations

import os

import numpy as np

from stablediff.checkpoint import AsyncCheckpointer, CheckpointStore, RetentionPolicy

from .conftest import CHUNK, first_chunk_path

FROZEN = np.random.default_rng(0).random(700, np.float32)
KEEP_2 = RetentionPolicy(keep_last=2, best_metric=None)


def _save(store, step: int, loss: float | None = None) -> None:
    metrics = {} if loss is None else {"val_loss": loss}
    store.save(step, {"frozen": FROZEN, "w": np.full(300, step, np.float32)}, metrics=metrics)


def _lose_chunk_of(store, step: int) -> None:
    os.remove(first_chunk_path(store, "w", step))  # `w` differs per step: only this checkpoint needs it


def _flip_bit_of(store, step: int) -> None:
    with open(first_chunk_path(store, "w", step), "r+b") as f:
        f.write(b"\xff")


def test_newest_manifests_with_a_missing_chunk_never_cause_the_last_good_checkpoint_to_be_deleted(store):
    for step in (1, 2, 3, 4, 5):
        _save(store, step)
    _lose_chunk_of(store, 4)
    _lose_chunk_of(store, 5)
    report = KEEP_2.apply(store)
    assert report.deleted_steps == [] and report.held_back == [1, 2, 3]
    assert "no kept checkpoint is known good" in report.held_reason and "step 5: chunk" in report.held_reason
    assert store.load().step == 3


def test_a_newest_checkpoint_that_fails_its_rehash_does_not_license_deletions(store, monkeypatch):
    for step in (1, 2, 3, 4, 5):
        _save(store, step)
    _flip_bit_of(store, 5)
    fresh = CheckpointStore(store.location, chunk_bytes=CHUNK)  # a process that did not write step 5
    report = KEEP_2.apply(fresh)
    assert report.deleted_steps == [1, 2, 3] and report.held_back == []  # step 4 re-hashed fine: the anchor
    assert fresh.load().step == 4
    _save(fresh, 6)

    def no_reads(*args, **kwargs):
        raise AssertionError("the guard re-read a chunk this process already knows")

    monkeypatch.setattr(fresh, "read_chunk", no_reads)  # the newest is known good: the guard costs no reads
    assert KEEP_2.apply(fresh).deleted_steps == [4]


def test_deletions_newer_than_the_newest_known_good_are_held_back(store):
    for step, loss in ((1, 0.1), (2, 0.5), (3, 0.6), (4, 0.7), (5, 0.8), (6, 0.9)):
        _save(store, step, loss)
    _lose_chunk_of(store, 5)
    _lose_chunk_of(store, 6)
    report = RetentionPolicy(keep_last=2, keep_best=1).apply(store)  # keeps 1 (best), 5, 6
    assert report.deleted_steps == [] and report.held_back == [2, 3, 4]
    assert "newer than step 1" in report.held_reason
    assert store.load().step == 4


def test_the_writer_keeps_its_own_save_and_logs_why_when_newer_checkpoints_are_damaged(store):
    for step in (1, 2, 3, 8, 9):  # 8 and 9 from an earlier life of the run, now damaged
        _save(store, step)
    _lose_chunk_of(store, 8)
    _lose_chunk_of(store, 9)
    lines: list[str] = []
    with AsyncCheckpointer(store, retention=KEEP_2, log=lines.append) as ckpt:
        ckpt.snapshot_and_save(4, {"frozen": FROZEN, "w": np.full(300, 4, np.float32)})
    assert store.steps() == [1, 2, 3, 4, 8, 9]  # without the guard: 1-4 deleted, nothing loadable left
    assert any("retention held back deleting step 1, 2, 3, 4" in line for line in lines)
    assert store.load().step == 4
