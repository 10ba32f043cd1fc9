"""CheckpointStore: layout, round trips, content addressing, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from stablediff.checkpoint import CheckpointError, CheckpointStore, gc

from .conftest import CHUNK, assert_same, every_dtype


def test_every_dtype_round_trips_bit_exactly(store):
    tensors = every_dtype()
    store.save(10, tensors, meta={"epoch": 1}, metrics={"val_loss": 0.25})
    loaded = store.load(10)
    assert loaded.tensors.keys() == tensors.keys()
    for name, original in tensors.items():
        assert_same(loaded.tensors[name], original)


def test_meta_and_metrics_round_trip_as_plain_json(store):
    meta = {"config": {"lr": 1e-4, "betas": (0.9, 0.999)}, "python_rng": [3, [1, 2], None], "name": "ünï"}
    store.save(1, {"w": np.zeros(3, np.float32)}, meta=meta, metrics={"val_loss": 1, "fid": float("nan")})
    loaded = store.load(1)
    assert loaded.meta == json.loads(json.dumps(meta))  # tuples come back as lists
    assert loaded.metrics["val_loss"] == 1.0 and np.isnan(loaded.metrics["fid"])


def test_layout_is_objects_by_hash_and_one_manifest_per_step(store):
    store.save(7, {"w": np.arange(600, dtype=np.float32)})  # 2400 bytes -> 3 chunks
    root = store.location
    assert os.listdir(os.path.join(root, "manifests")) == ["000000000007.json"]
    chunks = store.read_manifest(7).tensors["w"].chunks
    assert len(chunks) == 3
    for digest in chunks:
        assert os.path.isfile(os.path.join(root, "objects", digest[:2], digest))


def test_unchanged_tensors_cost_no_new_bytes(store):
    rng = np.random.default_rng(0)
    tensors = {"frozen_vae": rng.random(5000, np.float32), "unet": rng.random(3000, np.float32)}
    first = store.save(1, tensors)
    second = store.save(2, tensors)
    assert first.bytes_new == first.bytes_total == 32000
    assert second.bytes_new == 0
    assert second.bytes_total == 32000


def test_changing_one_value_writes_only_its_chunk(store):
    unet = np.arange(3000, dtype=np.float32)  # 12000 bytes -> 12 chunks
    store.save(1, {"frozen": np.ones(5000, np.float32), "unet": unet})
    unet = unet.copy()
    unet[1000] = -1.0  # byte 4000 -> the fourth chunk
    manifest = store.save(2, {"frozen": np.ones(5000, np.float32), "unet": unet})
    assert manifest.bytes_new == CHUNK
    before, after = store.read_manifest(1).tensors["unet"].chunks, manifest.tensors["unet"].chunks
    assert [i for i, (a, b) in enumerate(zip(before, after)) if a != b] == [3]


def test_identical_chunks_within_one_save_are_stored_once(store):
    manifest = store.save(1, {"zeros": np.zeros(4 * CHUNK, np.uint8)})
    assert len(set(manifest.tensors["zeros"].chunks)) == 1
    assert manifest.bytes_new == CHUNK


def test_list_summarises_each_checkpoint(store):
    store.save(100, {"w": np.zeros(10, np.float32)}, metrics={"val_loss": 0.5})
    store.save(200, {"w": np.ones(10, np.float32)}, metrics={"val_loss": 0.4})
    summaries = store.list()
    assert [s.step for s in summaries] == [100, 200]
    assert all(s.valid for s in summaries)
    assert summaries[1].metrics == {"val_loss": 0.4}
    assert (summaries[1].bytes_total, summaries[1].bytes_new) == (40, 40)


def test_load_without_step_picks_the_newest(store):
    for step in (5, 15, 10):
        store.save(step, {"w": np.full(4, step, np.int64)})
    loaded = store.load()
    assert loaded.step == 15 and loaded.skipped == []
    assert loaded.tensors["w"].tolist() == [15] * 4


def test_saving_an_existing_step_replaces_it(store):
    store.save(3, {"w": np.zeros(4, np.float32)})
    store.save(3, {"w": np.ones(4, np.float32)})
    assert store.steps() == [3]
    assert store.load(3).tensors["w"].tolist() == [1.0] * 4


def test_empty_store_raises_an_actionable_error(store):
    with pytest.raises(CheckpointError, match="no checkpoint in .*start the run from scratch"):
        store.load()


def test_unknown_step_error_lists_the_available_steps(store):
    store.save(100, {"w": np.zeros(1, np.float32)})
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 250 .*available steps: 100"):
        store.load(250)


def test_meta_that_is_not_json_is_refused_before_writing(store):
    with pytest.raises(CheckpointError, match="meta must be plain JSON"):
        store.save(1, {"w": np.zeros(1, np.float32)}, meta={"rng": object()})
    assert store.steps() == []


def test_unsupported_dtype_and_non_tensor_values_are_refused(store):
    with pytest.raises(CheckpointError, match="complex64"):
        store.save(1, {"w": np.zeros(2, np.complex64)})
    with pytest.raises(CheckpointError, match="put plain Python values into `meta`"):
        store.save(1, {"w": [1, 2, 3]})


def test_fsspec_memory_store_uses_the_same_format(tmp_path):
    fs = MemoryFileSystem(global_store=False, skip_instance_cache=True)
    remote = CheckpointStore("/run/ckpt", fs=fs, chunk_bytes=CHUNK)
    tensors = every_dtype(seed=3)
    remote.save(1, tensors, metrics={"val_loss": 1.0})
    remote.save(2, tensors)
    assert remote.read_manifest(2).bytes_new == 0
    for name, original in tensors.items():
        assert_same(remote.load().tensors[name], original)
    assert remote.verify(deep=True).ok


def test_memory_url_works_like_a_path():
    url_store = CheckpointStore("memory://stablediff-test-url/ckpt", chunk_bytes=CHUNK)
    url_store.save(1, {"w": torch.arange(10)})
    assert url_store.load().tensors["w"].tolist() == list(range(10))


def test_torn_temp_files_are_ignored_by_readers_and_removed_by_gc(store):
    store.save(1, {"w": np.arange(500, dtype=np.float32)})
    root = store.location
    os.makedirs(os.path.join(root, "objects", "ab"), exist_ok=True)
    torn_chunk = os.path.join(root, "objects", "ab", "ab" + "0" * 62 + ".tmp-123-deadbeef")
    torn_manifest = os.path.join(root, "manifests", "000000000002.json.tmp-123-deadbeef")
    for path in (torn_chunk, torn_manifest):
        with open(path, "wb") as f:
            f.write(b"half a fi")
    assert store.steps() == [1]
    assert store.load().step == 1
    report = store.verify(deep=True)
    assert report.ok and report.temp_files == 2
    assert gc(store, grace_s=0).temp_files_removed == 2
    assert not os.path.exists(torn_chunk) and not os.path.exists(torn_manifest)


def test_load_moves_tensors_to_the_requested_device(store):
    store.save(1, {"w": torch.ones(2)})
    assert store.load(device="cpu").tensors["w"].device.type == "cpu"
