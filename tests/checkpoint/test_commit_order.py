"""The commit order of a save, from an event log of the local filesystem layer.

A SIGKILL campaign cannot see a missing fsync (the page cache survives a killed
process; only a power loss drops it), so this test records the calls the store
makes into stablediff/io/atomic.py and asserts DESIGN.md's invariant 1: every chunk is
fsynced, renamed and its directory fsynced before the manifest's temp file is
created; the manifest is then fsynced, renamed and its directory fsynced, last.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from stablediff.checkpoint import AsyncCheckpointer
from stablediff.io import atomic

STEP = 7


@pytest.fixture
def events(monkeypatch, store):
    log: list[tuple[str, str]] = []
    root = store.location

    def rel(path: str) -> str:
        return os.path.relpath(path, root).replace(os.sep, "/")

    def spy(name: str, real, record):
        def wrapper(*args):
            log.append((name, record(*args)))
            return real(*args)

        monkeypatch.setattr(atomic, name, wrapper)

    spy("_create", atomic._create, lambda path: rel(path))
    spy("_fsync_file", atomic._fsync_file, lambda fd, path: rel(path))
    spy("_rename", atomic._rename, lambda src, dst: f"{rel(src)} -> {rel(dst)}")
    spy("_fsync_dir", atomic._fsync_dir, lambda path: rel(path))
    return log


def _final(target: str) -> str:
    return target.split(" -> ")[1]


def test_chunks_are_durable_before_the_manifest_and_the_manifest_commits_last(store, events):
    store.save(1, {"reused": np.arange(300, dtype=np.float32)})
    events.clear()
    rng = np.random.default_rng(0)
    state = {"reused": np.arange(300, dtype=np.float32), "a": rng.random(900, np.float32), "b": rng.random(40)}
    with AsyncCheckpointer(store) as ckpt:  # the trainer's path: the background writer
        ckpt.snapshot_and_save(STEP, state)
    manifest = store.manifest_rel(STEP)
    at = {event: i for i, event in enumerate(events)}
    renames = [(i, target) for i, (kind, target) in enumerate(events) if kind == "_rename"]
    chunk_renames = [(i, t) for i, t in renames if _final(t).startswith("objects/")]
    written = {d for entry in store.read_manifest(STEP).tensors.values() for d in entry.chunks} - set(
        store.read_manifest(1).chunk_refs())
    assert {_final(t).rsplit("/", 1)[1] for _i, t in chunk_renames} == written  # the reused chunk is not rewritten

    manifest_temp = next(i for i, (kind, path) in enumerate(events) if kind == "_create" and manifest in path)
    for i, target in chunk_renames:
        tmp, final = target.split(" -> ")
        assert at[("_create", tmp)] < at[("_fsync_file", tmp)] < i  # chunk fsync -> rename
        assert i < at[("_fsync_dir", final.rsplit("/", 1)[0])] < manifest_temp  # -> directory fsync -> manifest
    [(rename_at, target)] = [(i, t) for i, t in renames if _final(t) == manifest]
    tmp = target.split(" -> ")[0]
    assert manifest_temp < at[("_fsync_file", tmp)] < rename_at  # manifest temp -> fsync -> rename
    assert events[-1] == ("_fsync_dir", "manifests") and rename_at == len(events) - 2  # -> directory fsync, last
