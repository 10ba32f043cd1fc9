"""Rollback lineage: abandoned checkpoints stay on disk, are listed with --all, and are never chosen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stablediff.checkpoint import CheckpointError, RetentionPolicy, gc, lineage, sync
from stablediff.checkpoint.lineage import RollbackRecord
from stablediff.checkpoint.manifest import parse_manifest


def save_steps(store, steps, offset=0.0):
    for step in steps:
        store.save(step, {"w": np.full(600, step + offset, dtype=np.float32)}, meta={"guard": {"rollbacks": 0}})


def rollback_to(target, stores, number=1, lr_scale=0.5):
    """What the training run commits on a rollback (training/rollback.py), for stores[0]."""
    return RollbackRecord(number=number, target_step=target, first_bad_step=target, at_step=target + 9,
                          abandoned=lineage.manifests_after(stores, target), lr_scale=lr_scale, skipped_batches=10,
                          guard={"rollbacks": number}, time=1.0)


def test_resume_loads_the_rollback_target_not_the_newer_abandoned_checkpoints(store):
    save_steps(store, range(1, 6))
    lineage.commit(store, rollback_to(2, [store]))
    loaded = store.load()
    assert loaded.step == 2 and not loaded.skipped  # set aside on purpose: not "skipped as damaged"
    assert [s.step for s in store.list()] == [1, 2]


def test_abandoned_checkpoints_stay_on_disk_and_are_listed_marked_with_include_abandoned(store):
    save_steps(store, range(1, 5))
    lineage.commit(store, rollback_to(2, [store]))
    listed = store.list(include_abandoned=True)
    assert [(s.step, s.abandoned_by) for s in listed] == [(1, None), (2, None), (3, 1), (4, 1)]
    assert all(s.valid for s in listed)


def test_a_crash_between_the_record_and_the_moves_still_never_selects_them(store):
    save_steps(store, range(1, 5))
    lineage.write_record(store, rollback_to(2, [store]))  # killed before the manifests were moved aside
    assert store.steps() == [1, 2, 3, 4]
    assert store.load().step == 2
    assert [s.step for s in store.list()] == [1, 2]
    assert [(s.step, s.abandoned_by) for s in store.list(include_abandoned=True)][2:] == [(3, 1), (4, 1)]
    lineage.complete_moves(store)
    assert store.steps() == [1, 2]
    assert [s.abandoned_by for s in store.list(include_abandoned=True)] == [None, None, 1, 1]


def test_the_rolled_back_run_saving_the_same_step_again_is_live_and_keeps_the_abandoned_copy(store):
    save_steps(store, range(1, 5))
    lineage.commit(store, rollback_to(2, [store]))
    save_steps(store, [3], offset=0.5)  # the new trajectory's step 3: a different manifest
    loaded = store.load()
    assert loaded.step == 3 and float(loaded.tensors["w"][0]) == 3.5
    marks = [(s.step, s.abandoned_by) for s in store.list(include_abandoned=True)]
    assert marks == [(1, None), (2, None), (3, 1), (3, None), (4, 1)]


def test_loading_an_abandoned_step_by_number_says_why_not(store):
    save_steps(store, range(1, 5))
    lineage.commit(store, rollback_to(2, [store]))
    with pytest.raises(CheckpointError, match="abandoned by a divergence rollback.*ckpt list --all"):
        store.load(step=4)


def test_gc_keeps_the_chunks_of_abandoned_checkpoints(store):
    save_steps(store, range(1, 5))
    lineage.commit(store, rollback_to(2, [store]))
    gc(store, grace_s=0)
    copies = sorted((Path(store.location) / "abandoned").glob("0*.json"))
    assert len(copies) == 2
    for path in copies:  # nothing collected out from under them
        manifest = parse_manifest(path.read_bytes(), str(path))
        assert all(store.chunk_size(h) == size for h, size in manifest.chunk_refs().items())


def test_retention_never_counts_abandoned_checkpoints_as_the_newest_and_keeps_the_target(store):
    save_steps(store, range(1, 8))
    lineage.commit(store, rollback_to(3, [store]))
    save_steps(store, [4, 5], offset=0.5)  # the rolled-back trajectory
    report = RetentionPolicy(keep_last=2, best_metric=None).apply(store)
    assert report.deleted_steps == [1, 2]  # 3 is the rollback target; 6 and 7 are abandoned, not "newest"
    assert store.steps() == [3, 4, 5]
    assert store.load().step == 5


def test_the_newest_checkpoint_older_than_the_guard_window_is_kept():
    from stablediff.checkpoint.retention import rollback_keeps

    assert rollback_keeps([10, 20, 30, 40, 50, 60], window=25) == {30}
    assert rollback_keeps([10, 20, 30], window=50) == {10}  # early in a run: the oldest
    assert rollback_keeps([10, 20, 30], window=None, targets=[20, 99]) == {20}


def test_retention_with_the_guard_window_leaves_a_rollback_target_before_any_bad_step(store):
    policy = RetentionPolicy(keep_last=2, best_metric=None, rollback_window=5)
    for step in range(0, 21):
        save_steps(store, [step])
        policy.apply(store)
    # the guard counts bad steps within the last 5, so the first one is later than step 15
    assert any(s <= 15 for s in store.steps()) and store.steps()[-2:] == [19, 20]


def test_a_replica_gets_the_record_at_the_next_sync_and_its_copies_are_never_chosen(store, replica):
    save_steps(store, range(1, 5))
    sync(store, replica)
    lineage.commit(store, rollback_to(2, [store, replica]))  # the replica was unreachable: not told
    assert store.load(fallbacks=[replica]).step == 2  # the primary's record covers the replica's copies
    save_steps(store, [3], offset=0.5)
    sync(store, replica)
    assert replica.load().step == 3 and float(replica.load().tensors["w"][0]) == 3.5
    assert [(s.step, s.abandoned_by) for s in replica.list(include_abandoned=True)][-2:] == [(3, None), (4, 1)]


def test_pending_rollback_is_the_newest_one_a_checkpoint_predates():
    records = [RollbackRecord(n, 2, 2, 9, {}, 0.5 ** n, 10, {"rollbacks": n}) for n in (1, 2)]
    assert lineage.pending_rollback(records, {"guard": {"rollbacks": 0}}).number == 2
    assert lineage.pending_rollback(records, {"guard": {"rollbacks": 1}}).number == 2
    assert lineage.pending_rollback(records, {"guard": {"rollbacks": 2}}) is None


def test_a_corrupt_record_is_ignored_but_moved_copies_still_count(store):
    save_steps(store, range(1, 5))
    lineage.commit(store, rollback_to(2, [store]))
    with open(Path(store.location) / "abandoned" / "rollback-0001.json", "r+b") as f:
        f.seek(20)
        f.write(b"#")
    assert lineage.read_records(store) == []
    assert store.load().step == 2


def test_gc_removes_temp_files_a_crash_left_in_the_lineage_folder(store):
    save_steps(store, range(1, 4))
    lineage.commit(store, rollback_to(1, [store]))
    leftover = Path(store.location) / "abandoned" / "rollback-0002.json.tmp-123-abcd1234"
    leftover.write_bytes(b"{")
    assert gc(store, grace_s=0).temp_files_removed == 1 and not leftover.exists()
    assert store.load().step == 1 and len(lineage.read_records(store)) == 1
