"""Retention: the pure keep/delete decision, then manifests-first deletion and gc."""

from __future__ import annotations

import os

import numpy as np
import pytest

from stablediff.checkpoint import ManifestSummary, RetentionPolicy, gc, select_to_delete


def _summaries(losses: dict[int, float | None], invalid: tuple[int, ...] = ()) -> list[ManifestSummary]:
    out = []
    for step, loss in losses.items():
        metrics = {} if loss is None else {"val_loss": loss}
        out.append(ManifestSummary(step, 0.0, 10, 1, metrics, valid=step not in invalid))
    return out


def test_keep_last_keeps_the_newest_n():
    summaries = _summaries({s: None for s in (100, 200, 300, 400, 500)})
    assert select_to_delete(summaries, RetentionPolicy(keep_last=2)) == [100, 200, 300]


def test_keep_best_keeps_the_lowest_metric_in_min_mode():
    summaries = _summaries({100: 0.9, 200: 0.1, 300: 0.5, 400: 0.2, 500: 0.8, 600: 0.7})
    policy = RetentionPolicy(keep_last=2, keep_best=2)
    assert select_to_delete(summaries, policy) == [100, 300]


def test_keep_best_in_max_mode_keeps_the_highest():
    summaries = _summaries({100: 0.9, 200: 0.1, 300: 0.5, 400: 0.2, 500: 0.8})
    policy = RetentionPolicy(keep_last=2, keep_best=1, best_metric="val_loss", best_mode="max")
    assert select_to_delete(summaries, policy) == [200, 300]


def test_the_single_best_is_kept_even_with_keep_best_zero():
    summaries = _summaries({100: 0.05, 200: 0.3, 300: 0.4, 400: 0.5})
    assert select_to_delete(summaries, RetentionPolicy(keep_last=2)) == [200]


def test_no_metric_tracking_when_best_metric_is_none():
    summaries = _summaries({100: 0.05, 200: 0.3, 300: 0.4})
    assert select_to_delete(summaries, RetentionPolicy(keep_last=2, best_metric=None)) == [100]


def test_keep_every_keeps_milestones():
    summaries = _summaries({s: None for s in range(100, 1100, 100)})
    policy = RetentionPolicy(keep_last=2, keep_every=500)
    assert select_to_delete(summaries, policy) == [100, 200, 300, 400, 600, 700, 800]


def test_corrupt_manifests_are_never_chosen_and_never_count_as_newest():
    summaries = _summaries({100: None, 200: None, 300: None, 400: None}, invalid=(400,))
    # 400 is corrupt: the newest *valid* ones are 200 and 300; 400 is left for repair.
    assert select_to_delete(summaries, RetentionPolicy(keep_last=2)) == [100]


def test_checkpoints_without_the_metric_are_not_considered_best():
    summaries = _summaries({100: None, 200: float("nan"), 300: 0.9, 400: 0.8, 500: 0.95})
    assert select_to_delete(summaries, RetentionPolicy(keep_last=2, keep_best=1)) == [100, 200, 300]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keep_last": 1}, "keep_last must be at least 2"),
        ({"keep_best": -1}, "keep_best"),
        ({"best_mode": "lowest"}, "best_mode"),
        ({"keep_every": 0}, "keep_every"),
    ],
)
def test_invalid_policies_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetentionPolicy(**kwargs)


def _chunk_files(store) -> set[str]:
    return {h for h in store.object_sizes()}


def test_apply_deletes_manifests_and_exactly_their_unreferenced_chunks(store):
    rng = np.random.default_rng(0)
    frozen = rng.random(500, np.float32)
    for step, loss in ((1, 0.1), (2, 0.5), (3, 0.6), (4, 0.7)):
        store.save(step, {"frozen": frozen, "w": rng.random(300, np.float32)}, metrics={"val_loss": loss})
    needed = {s: set(store.read_manifest(s).chunk_refs()) for s in store.steps()}
    report = RetentionPolicy(keep_last=2, keep_best=1).apply(store)
    assert report.deleted_steps == [2]
    assert store.steps() == [1, 3, 4]
    assert _chunk_files(store) == needed[1] | needed[3] | needed[4]
    assert report.gc.chunks_removed == len(needed[2] - needed[1] - needed[3] - needed[4]) == 2
    assert store.verify(deep=True).ok


def test_the_step_eval_json_marks_best_is_kept_whatever_keep_best_ranks_by(store, tmp_path):
    from stablediff.io.run_files import update_eval

    rng = np.random.default_rng(0)
    for step, loss in ((1, 0.1), (2, 0.5), (3, 0.6), (4, 0.7)):
        store.save(step, {"w": rng.random(300, np.float32)}, metrics={"val_loss": loss})
    update_eval(tmp_path, best={"step": 2, "metric": "fd", "mode": "min", "value": 3.0})  # `stablediff eval`'s
    report = RetentionPolicy(keep_last=2, keep_best=1, marked_in=tmp_path).apply(store)
    assert report.deleted_steps == []
    assert store.steps() == [1, 2, 3, 4]
    (tmp_path / "eval.json").write_text("{torn")  # an unreadable mark protects nothing, and breaks nothing
    assert RetentionPolicy(keep_last=2, keep_best=1, marked_in=tmp_path).apply(store).deleted_steps == [2]


def test_gc_removes_only_unreferenced_chunks(store):
    store.save(1, {"w": np.arange(1000, dtype=np.float32)})
    kept = _chunk_files(store)
    orphan = store.save(2, {"w": np.arange(1000, 2000, dtype=np.float32)})
    os.remove(os.path.join(store.location, store.manifest_rel(2)))  # as if retention had run
    report = gc(store, grace_s=0)
    assert report.chunks_removed == len(orphan.tensors["w"].chunks)
    assert _chunk_files(store) == kept
    assert store.load().step == 1


def test_gc_grace_period_spares_chunks_of_a_save_in_progress(store):
    store.save(1, {"w": np.arange(1000, dtype=np.float32)})
    os.remove(os.path.join(store.location, store.manifest_rel(1)))  # chunks written, manifest not yet
    report = gc(store)  # default grace: another process may be mid-save
    assert report.chunks_removed == 0 and report.young_files_kept == 4
