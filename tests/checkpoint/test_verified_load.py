"""Loading verifies every byte and falls back: to a replica's copy, then to an older step."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from stablediff.checkpoint import CheckpointError, sync

from .conftest import first_chunk_path


def _save_three(store):
    rng = np.random.default_rng(0)
    frozen = rng.random(2000, np.float32)  # shared by every step
    for step in (100, 200, 300):
        store.save(step, {"frozen": frozen, "unet": rng.random(1000, np.float32)}, meta={"step": step})
    return frozen


def _flip_bit(path: str, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(bit // 8)
        byte = f.read(1)[0]
        f.seek(bit // 8)
        f.write(bytes([byte ^ (1 << (bit % 8))]))


def test_random_bit_flips_in_chunks_are_always_detected(store):
    _save_three(store)
    manifest = store.read_manifest(300)
    paths = [store.location + "/" + store.object_rel(h) for h in manifest.tensors["unet"].chunks]
    rand = random.Random(0)
    for _trial in range(60):
        path = rand.choice(paths)
        bit = rand.randrange(os.path.getsize(path) * 8)
        _flip_bit(path, bit)
        with pytest.raises(CheckpointError, match="corrupt"):
            store.load(300)
        _flip_bit(path, bit)  # restore for the next trial
    assert store.load(300).step == 300


def test_random_bit_flips_in_the_manifest_are_always_detected(store):
    _save_three(store)
    path = os.path.join(store.location, store.manifest_rel(300))
    rand = random.Random(1)
    for _trial in range(40):
        bit = rand.randrange(os.path.getsize(path) * 8)
        _flip_bit(path, bit)
        with pytest.raises(CheckpointError):
            store.load(300)
        _flip_bit(path, bit)
    assert store.load(300).step == 300


def test_truncated_chunk_is_detected(store):
    _save_three(store)
    path = first_chunk_path(store, "unet", 300)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="truncated"):
        store.load(300)


def test_missing_chunk_is_detected(store):
    _save_three(store)
    os.remove(first_chunk_path(store, "unet", 300))
    with pytest.raises(CheckpointError, match="missing"):
        store.load(300)


def test_corrupt_newest_falls_back_and_says_which_and_why(store):
    _save_three(store)
    path = first_chunk_path(store, "unet", 300)
    _flip_bit(path, 5)
    loaded = store.load()
    assert loaded.step == 200
    assert [s.step for s in loaded.skipped] == [300]
    digest = os.path.basename(path)
    assert f"chunk {digest[:12]}… of tensor 'unet' is corrupt" in loaded.skipped[0].reason
    assert loaded.notes()[0].startswith("skipped step 300: chunk ")


def test_bad_chunk_is_taken_from_a_replica_before_falling_back(store, replica):
    _save_three(store)
    sync(store, replica)
    path = first_chunk_path(store, "unet", 300)
    _flip_bit(path, 12)
    loaded = store.load(fallbacks=[replica])
    assert loaded.step == 300 and loaded.skipped == []
    assert loaded.tensors["unet"].numpy().tobytes() == replica.load(300).tensors["unet"].numpy().tobytes()
    [recovery] = loaded.recovered
    assert recovery.source == replica.location and recovery.tensor == "unet"
    assert recovery.problem.startswith("corrupt")


def test_a_chunk_bad_everywhere_falls_back_to_an_older_step(store, replica):
    _save_three(store)
    sync(store, replica)
    _flip_bit(first_chunk_path(store, "unet", 300), 1)
    _flip_bit(first_chunk_path(replica, "unet", 300), 1)
    loaded = store.load(fallbacks=[replica])
    assert loaded.step == 200
    assert "no replica has a good copy" in loaded.skipped[0].reason


def test_manifest_with_bad_checksum_is_skipped(store):
    _save_three(store)
    path = os.path.join(store.location, store.manifest_rel(300))
    text = open(path).read().replace('"step":300', '"step":301')
    with open(path, "w") as f:
        f.write(text)
    loaded = store.load()
    assert loaded.step == 200
    assert "fails its checksum" in loaded.skipped[0].reason
    assert [s.valid for s in store.list()] == [True, True, False]


def test_truncated_manifest_is_skipped(store):
    _save_three(store)
    path = os.path.join(store.location, store.manifest_rel(300))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    loaded = store.load()
    assert loaded.step == 200
    assert "not valid JSON" in loaded.skipped[0].reason


def test_damaged_manifest_is_read_from_a_replica(store, replica):
    _save_three(store)
    sync(store, replica)
    with open(os.path.join(store.location, store.manifest_rel(300)), "wb") as f:
        f.write(b"{")
    loaded = store.load(fallbacks=[replica])
    assert loaded.step == 300
    assert loaded.recovered[0].item == "manifest"


def test_unreachable_replica_does_not_stop_a_load(store, tmp_path):
    from stablediff.checkpoint import CheckpointStore

    _save_three(store)
    (tmp_path / "a_file").write_text("not a directory")
    broken = CheckpointStore(tmp_path / "a_file" / "replica")
    assert store.load(fallbacks=[broken]).step == 300


def test_all_checkpoints_corrupt_raises_with_every_reason(store):
    _save_three(store)
    _flip_bit(first_chunk_path(store, "frozen", 100), 0)  # the shared chunk breaks every step
    with pytest.raises(CheckpointError, match=r"all 3 checkpoints .*step 300: .*step 200: .*ckpt repair"):
        store.load()


def test_explicit_step_that_is_corrupt_is_not_silently_replaced(store):
    _save_three(store)
    _flip_bit(first_chunk_path(store, "unet", 200), 0)
    with pytest.raises(CheckpointError, match="step 200 .* cannot be loaded.*corrupt"):
        store.load(200)
