"""verify: shallow finds missing/resized chunks and bad manifests; deep also finds bit rot."""

from __future__ import annotations

import os

import numpy as np

from .conftest import first_chunk_path


def _two_steps(store):
    rng = np.random.default_rng(1)
    store.save(1, {"a": rng.random(700, np.float32), "b": rng.random(300, np.float32)})
    store.save(2, {"a": rng.random(700, np.float32), "b": rng.random(300, np.float32)})


def test_healthy_store_verifies_shallow_and_deep(store):
    _two_steps(store)
    for deep in (False, True):
        report = store.verify(deep=deep)
        assert report.ok and report.steps_ok == [1, 2] and report.chunks_checked == 10  # (3 + 2) chunks x 2 steps


def test_shallow_verify_finds_missing_and_truncated_chunks(store):
    _two_steps(store)
    os.remove(first_chunk_path(store, "a", 2))
    with open(first_chunk_path(store, "b", 1), "r+b") as f:
        f.truncate(10)
    report = store.verify(deep=False)
    assert not report.ok
    assert sorted(p.problem.split(" ")[0] for p in report.chunk_problems) == ["missing", "truncated"]
    assert report.damaged_steps == [1, 2] and report.steps_ok == []


def test_only_deep_verify_finds_a_flipped_bit(store):
    _two_steps(store)
    path = first_chunk_path(store, "b", 2)
    with open(path, "r+b") as f:
        f.write(b"\xff\xff")
    assert store.verify(deep=False).ok
    deep = store.verify(deep=True)
    [problem] = deep.chunk_problems
    assert problem.problem.startswith("corrupt") and problem.steps == (2,)
    assert deep.steps_ok == [1]
    assert any("needed by step 2" in line for line in deep.lines())


def test_verify_reports_a_bad_manifest_by_step(store):
    _two_steps(store)
    with open(os.path.join(store.location, store.manifest_rel(1)), "ab") as f:
        f.write(b"garbage")
    report = store.verify()
    assert list(report.bad_manifests) == [1] and report.steps_ok == [2]
