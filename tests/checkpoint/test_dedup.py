"""Deduplication heals: the first reuse of a chunk in a process checks its bytes and rewrites a damaged copy.

A new `CheckpointStore` instance on the same directory stands for a new process
(the known-good set lives in the instance); tests/e2e/test_ckpt_heal.py does the
same with real `stablediff train` processes.
"""

from __future__ import annotations

import os
import time

import numpy as np

from stablediff.checkpoint import AsyncCheckpointer, CheckpointStore

from .conftest import CHUNK, first_chunk_path

FROZEN = np.random.default_rng(0).random(700, np.float32)  # 3 chunks, in every checkpoint


def _flip_a_bit(path: str) -> None:
    with open(path, "r+b") as f:
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0x01]))


def _new_process(store: CheckpointStore) -> CheckpointStore:
    return CheckpointStore(store.location, chunk_bytes=CHUNK)


def _state(step: int) -> dict:
    return {"frozen": FROZEN, "w": np.full(300, step, np.float32)}


def test_a_flipped_bit_in_a_shared_chunk_is_healed_by_the_next_save(store):
    store.save(1, _state(1))
    store.save(2, _state(2))
    _flip_a_bit(first_chunk_path(store, "frozen", 2))
    assert store.verify(deep=True).damaged_steps == [1, 2]
    later = _new_process(store)
    later.save(3, _state(3))
    digest = later.read_manifest(3).tensors["frozen"].chunks[0]
    assert later.last_save.healed == [digest]
    report = later.verify(deep=True)
    assert report.ok and report.steps_ok == [1, 2, 3]  # the older checkpoints that share it are whole again


def test_a_chunk_of_the_wrong_size_is_rewritten_and_counted_as_healed(store):
    store.save(1, _state(1))
    with open(first_chunk_path(store, "frozen", 1), "r+b") as f:
        f.truncate(10)
    later = _new_process(store)
    later.save(2, _state(2))
    assert len(later.last_save.healed) == 1 and later.last_save.bytes_new == 1200  # only `w` is new
    assert later.verify(deep=True).ok


def test_the_first_reuse_in_a_process_checks_each_chunk_once_and_later_saves_pay_nothing(store):
    store.save(1, _state(1))
    assert store.last_save.written == 5 and store.last_save.checked == 0
    store.save(2, _state(2))
    assert store.last_save.reused == 3 and store.last_save.checked == 0  # written by this process
    later = _new_process(store)
    later.save(3, _state(3))
    assert later.last_save.checked == 3 and later.last_save.bytes_checked == 2800
    later.save(4, _state(4))
    assert later.last_save.reused == 3 and later.last_save.checked == 0


def test_chunks_a_load_has_verified_need_no_check_at_the_next_save(store):
    store.save(1, _state(1))
    later = _new_process(store)
    later.load()  # every chunk is hashed as it is read
    later.save(2, _state(2))
    assert later.last_save.reused == 3 and later.last_save.checked == 0


def test_a_resume_past_a_corrupt_chunk_does_not_reference_it_again(store):
    store.save(1, _state(1))
    store.save(2, _state(2))
    _flip_a_bit(first_chunk_path(store, "w", 2))  # only step 2 has this chunk
    later = _new_process(store)
    loaded = later.load()
    assert loaded.step == 1 and [s.step for s in loaded.skipped] == [2]
    later.save(2, _state(2))  # the resumed run computes the same step 2 again, bit for bit
    assert len(later.last_save.healed) == 1
    assert later.load().step == 2 and later.verify(deep=True).ok


def test_a_save_that_reuses_a_chunk_touches_it(store):
    store.save(1, _state(1))
    path = first_chunk_path(store, "frozen", 1)
    long_ago = time.time() - 7 * 24 * 3600
    os.utime(path, (long_ago, long_ago))
    store.save(2, _state(2))
    assert os.stat(path).st_mtime > time.time() - 60  # gc's grace counts from this save


def test_the_writer_logs_healed_chunks(store):
    store.save(1, _state(1))
    _flip_a_bit(first_chunk_path(store, "frozen", 1))
    lines: list[str] = []
    with AsyncCheckpointer(_new_process(store), log=lines.append) as ckpt:
        stats = ckpt.snapshot_and_save(2, _state(2))
    assert stats.chunks_healed == 1 and stats.chunks_checked == 3
    assert any("healed 1 damaged chunk" in line for line in lines)
