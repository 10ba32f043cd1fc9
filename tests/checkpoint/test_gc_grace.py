"""gc's grace period counts from a chunk's last reference, and an unknown age counts as young."""

from __future__ import annotations

import os
import time

import numpy as np
from fsspec.implementations.memory import MemoryFileSystem

from stablediff.checkpoint import CheckpointStore, gc

from .conftest import CHUNK

FROZEN = np.random.default_rng(0).random(700, np.float32)  # 3 chunks


class TimelessMemoryFS(MemoryFileSystem):
    """An in-memory fsspec store that reports no modification times, as some remote stores do."""

    protocol = "timeless"

    def ls(self, path, detail=True, **kwargs):
        entries = super().ls(path, detail=detail, **kwargs)
        return [_no_times(e) for e in entries] if detail else entries

    def info(self, path, **kwargs):
        return _no_times(super().info(path, **kwargs))

    def find(self, path, maxdepth=None, withdirs=False, detail=False, **kwargs):
        found = super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)
        return {name: _no_times(entry) for name, entry in found.items()} if detail else found

    def modified(self, path):
        raise NotImplementedError


def _no_times(entry):
    return {k: v for k, v in entry.items() if k not in ("created", "mtime")} if isinstance(entry, dict) else entry


def _age_every_file(store: CheckpointStore, seconds: float) -> None:
    then = time.time() - seconds
    for dirpath, _dirs, files in os.walk(store.location):
        for name in files:
            os.utime(os.path.join(dirpath, name), (then, then))


def test_a_chunk_reused_by_a_recent_save_is_young_however_old_its_file(store):
    store.save(1, {"frozen": FROZEN, "w": np.zeros(300, np.float32)})
    _age_every_file(store, 2 * 3600)  # step 1 was written two hours ago
    store.save(2, {"frozen": FROZEN, "w": np.ones(300, np.float32)})  # reuses (and touches) `frozen`
    frozen = set(store.read_manifest(2).tensors["frozen"].chunks)
    old_w = set(store.read_manifest(1).tensors["w"].chunks)
    for step in (1, 2):  # e.g. a manifest deleted while a second save, not yet committed, reuses the chunks
        os.remove(os.path.join(store.location, store.manifest_rel(step)))
    report = gc(store)  # default grace of one hour
    left = set(store.object_sizes())
    assert frozen <= left and not old_w & left
    assert report.chunks_removed == len(old_w)


def test_a_chunk_of_unknown_age_counts_as_young(tmp_path):
    store = CheckpointStore(f"timeless://{tmp_path.name}", chunk_bytes=CHUNK, fs=TimelessMemoryFS())
    store.save(1, {"frozen": FROZEN})
    store.delete_manifest(1)  # its chunks are now unreferenced, their age unknown
    assert gc(store).chunks_removed == 0  # could belong to a save in flight
    assert gc(store, grace_s=0).chunks_removed == 3  # the writer's own retention still collects them
