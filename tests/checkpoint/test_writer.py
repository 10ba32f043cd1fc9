"""AsyncCheckpointer: snapshot in the loop, write in the background, one save in flight."""

from __future__ import annotations

import errno
import threading
import time

import numpy as np
import pytest
import torch

from stablediff.checkpoint import AsyncCheckpointer, CheckpointError, CheckpointStore, RetentionPolicy

from .conftest import CHUNK


class GatedStore(CheckpointStore):
    """A real store whose background save waits until the test opens the gate."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def save(self, *args, **kwargs):
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            assert self.gate.wait(timeout=20), "test never opened the gate"
            return super().save(*args, **kwargs)
        finally:
            with self._lock:
                self.in_flight -= 1


class FailingStore(CheckpointStore):
    """A real store whose disk is full for the steps listed in `fail_steps`."""

    fail_steps: set[int] = {1}

    def save(self, step, *args, **kwargs):
        if step in self.fail_steps:
            raise OSError(errno.ENOSPC, "No space left on device", self.location)
        return super().save(step, *args, **kwargs)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"unet.w": torch.randn(64, 64, generator=gen), "ema.w": torch.randn(64, 64, generator=gen)}


def test_snapshot_returns_before_the_write_finishes(tmp_path):
    store = GatedStore(tmp_path / "s", chunk_bytes=CHUNK)
    with AsyncCheckpointer(store) as ckpt:
        stats = ckpt.snapshot_and_save(1, _state())
        assert store.steps() == [] and stats.write_s is None
        store.gate.set()
        ckpt.wait()
    assert store.steps() == [1] and stats.write_s is not None and stats.bytes_new > 0


def test_second_save_waits_for_the_first_and_logs_the_wait(tmp_path):
    store = GatedStore(tmp_path / "s", chunk_bytes=CHUNK)
    messages: list[str] = []
    with AsyncCheckpointer(store, log=messages.append) as ckpt:
        ckpt.snapshot_and_save(1, _state(1))
        threading.Timer(0.3, store.gate.set).start()
        stats = ckpt.snapshot_and_save(2, _state(2))
        assert store.steps() == [1]  # the first save committed before the second snapshot
    assert stats.wait_s >= 0.25
    assert store.max_in_flight == 1
    assert any("waited" in m and "step 1" in m for m in messages)
    assert store.steps() == [1, 2]


def test_snapshot_is_isolated_from_later_updates(tmp_path):
    store = GatedStore(tmp_path / "s", chunk_bytes=CHUNK)
    state = _state()
    expected = {k: v.clone() for k, v in state.items()}
    with AsyncCheckpointer(store) as ckpt:
        ckpt.snapshot_and_save(1, state)
        for tensor in state.values():
            tensor.add_(1.0)  # the optimizer step after the save
        store.gate.set()
    loaded = store.load(1)
    assert all(torch.equal(loaded.tensors[k], expected[k]) for k in expected)


def test_host_buffers_are_allocated_once_and_reused(tmp_path):
    store = CheckpointStore(tmp_path / "s", chunk_bytes=CHUNK)
    state = {**_state(), "numpy_counter": np.arange(4)}
    with AsyncCheckpointer(store) as ckpt:
        ckpt.snapshot_and_save(1, state)
        torch_ptr = ckpt.host_buffer("unet.w").data_ptr()
        numpy_buffer = ckpt.host_buffer("numpy_counter")
        for step in (2, 3, 4):
            state["unet.w"].mul_(0.5)
            ckpt.snapshot_and_save(step, state)
            assert ckpt.host_buffer("unet.w").data_ptr() == torch_ptr
            assert ckpt.host_buffer("numpy_counter") is numpy_buffer
    assert torch.equal(store.load(4).tensors["unet.w"], state["unet.w"])


def test_buffers_of_tensors_that_went_away_are_released(tmp_path):
    store = CheckpointStore(tmp_path / "s", chunk_bytes=CHUNK)
    with AsyncCheckpointer(store) as ckpt:
        ckpt.snapshot_and_save(1, {"a": torch.ones(3), "b": torch.ones(3)})
        ckpt.snapshot_and_save(2, {"a": torch.ones(3)})
        with pytest.raises(KeyError):
            ckpt.host_buffer("b")


def test_background_error_surfaces_at_the_next_save(tmp_path):
    store = FailingStore(tmp_path / "s", chunk_bytes=CHUNK)
    ckpt = AsyncCheckpointer(store)
    ckpt.snapshot_and_save(1, _state())  # returns: the failure happens in the background
    with pytest.raises(CheckpointError, match=r"step 1 .*failed in the background.*No space left") as info:
        ckpt.snapshot_and_save(2, _state())
    assert isinstance(info.value.__cause__, OSError)
    ckpt.snapshot_and_save(3, _state())  # the error is reported once; saving goes on
    ckpt.close()
    assert store.steps() == [3]


def test_background_error_surfaces_at_wait_and_close(tmp_path):
    store = FailingStore(tmp_path / "s", chunk_bytes=CHUNK)
    ckpt = AsyncCheckpointer(store)
    ckpt.snapshot_and_save(1, _state())
    with pytest.raises(CheckpointError, match="step 1"):
        ckpt.wait()
    ckpt.snapshot_and_save(1, _state())
    with pytest.raises(CheckpointError, match="step 1"):
        ckpt.close()


def test_bad_meta_fails_in_the_training_thread(tmp_path):
    with AsyncCheckpointer(CheckpointStore(tmp_path / "s")) as ckpt:
        with pytest.raises(CheckpointError, match="meta must be plain JSON"):
            ckpt.snapshot_and_save(1, _state(), meta={"generator": torch.Generator()})


def test_retention_runs_after_each_save(tmp_path):
    store = CheckpointStore(tmp_path / "s", chunk_bytes=CHUNK)
    with AsyncCheckpointer(store, retention=RetentionPolicy(keep_last=2, keep_best=1)) as ckpt:
        for step, loss in ((1, 0.1), (2, 0.9), (3, 0.8), (4, 0.7)):
            ckpt.snapshot_and_save(step, _state(step), metrics={"val_loss": loss})
    assert store.steps() == [1, 3, 4]
    report = store.verify(deep=True)
    assert report.ok and report.orphan_chunks == 0


def test_timings_are_recorded_per_save(tmp_path):
    with AsyncCheckpointer(CheckpointStore(tmp_path / "s")) as ckpt:
        for step in (1, 2):
            ckpt.snapshot_and_save(step, _state())
            time.sleep(0.01)
    assert [s.step for s in ckpt.stats] == [1, 2]
    for stats in ckpt.stats:
        assert stats.snapshot_s >= 0 and stats.wait_s >= 0 and stats.write_s >= stats.primary_s > 0
    assert ckpt.stats[1].bytes_new == 0  # same tensors: nothing new to write
