"""Store ownership: a run's identity lives in its primary store; another run's replica is never shared."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from stablediff.checkpoint import CheckpointStore, repair, sync
from stablediff.checkpoint.ownership import (OWNER_FILE, StoreOwnedByAnotherRun, StoreOwner, claim, read_owner,
                                             run_owner)

from .conftest import CHUNK


def _state(step: int) -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(step).random(600, np.float32)}


def test_a_new_run_gets_an_id_that_stays_the_same(store, tmp_path):
    first = run_owner(store, tmp_path)
    assert run_owner(store, tmp_path) == first
    record = json.loads(open(f"{store.location}/{OWNER_FILE}").read())
    assert record["run_id"] == first.run_id and record["run_dir"] == str(tmp_path)


def test_a_store_of_an_older_version_is_adopted_silently(store, tmp_path):
    store.save(1, _state(1))  # as an older stablediff left it: checkpoints, no owner file
    assert read_owner(store) is None
    owner = run_owner(store, tmp_path)
    assert read_owner(store) == owner and store.verify(deep=True).ok


def test_claim_refuses_a_store_another_run_owns(replica, tmp_path):
    other, this = StoreOwner.new(tmp_path / "a"), StoreOwner.new(tmp_path / "b")
    claim(replica, other)
    with pytest.raises(StoreOwnedByAnotherRun) as refused:
        claim(replica, this)
    message = str(refused.value)
    assert f"replica {replica.location} belongs to another run" in message
    assert str(tmp_path / "a") in message and f"{replica.location}/{OWNER_FILE}" in message
    assert read_owner(replica) == other


def test_claim_by_the_owner_again_is_a_no_op(replica, tmp_path):
    owner = StoreOwner.new(tmp_path)
    claim(replica, owner)
    claim(replica, owner)
    assert read_owner(replica) == owner


def test_two_runs_claiming_one_replica_at_once_leave_one_owner(tmp_path):
    owners = [StoreOwner.new(tmp_path / f"run{i}") for i in range(8)]
    gate, refused = threading.Barrier(len(owners)), []

    def race(owner: StoreOwner) -> None:
        gate.wait()
        try:
            claim(CheckpointStore(tmp_path / "replica"), owner)
        except StoreOwnedByAnotherRun:
            refused.append(owner)

    threads = [threading.Thread(target=race, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = read_owner(CheckpointStore(tmp_path / "replica"))
    assert len(refused) == len(owners) - 1 and winner in owners and winner not in refused


def test_sync_claims_an_unowned_replica_for_the_source_run(store, replica, tmp_path):
    owner = run_owner(store, tmp_path)
    store.save(1, _state(1))
    assert sync(store, replica).steps_copied == [1]
    assert read_owner(replica) == owner


def test_sync_refuses_a_replica_of_another_run_and_copies_nothing(store, replica, tmp_path):
    run_owner(store, tmp_path / "this")
    claim(replica, StoreOwner.new(tmp_path / "other"))
    store.save(1, _state(1))
    with pytest.raises(StoreOwnedByAnotherRun):
        sync(store, replica)
    assert replica.steps() == []


def test_repair_leaves_a_replica_of_another_run_alone(store, tmp_path):
    run_owner(store, tmp_path / "this")
    store.save(1, _state(1))
    foreign = CheckpointStore(tmp_path / "foreign", chunk_bytes=CHUNK)
    claim(foreign, StoreOwner.new(tmp_path / "other"))
    foreign.save(7, _state(7))  # the other run's checkpoint must not be restored into this store
    report = repair(store, [foreign])
    assert not report.ok and "belongs to another run" in report.unfixable[0]
    assert store.steps() == [1] and foreign.steps() == [7]


def test_ownership_works_on_an_fsspec_store(tmp_path):
    remote = CheckpointStore(f"memory://{tmp_path.name}/replica")
    owner = StoreOwner.new(tmp_path)
    claim(remote, owner)
    assert read_owner(remote) == owner
    with pytest.raises(StoreOwnedByAnotherRun):
        claim(remote, StoreOwner.new(tmp_path / "other"))
