"""Shared fixtures: small real stores on disk, tensors of every supported dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stablediff.checkpoint import CheckpointStore

CHUNK = 1024  # small chunks so that modest tensors span several of them


@pytest.fixture
def store(tmp_path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "primary", chunk_bytes=CHUNK)


@pytest.fixture
def replica(tmp_path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "replica", chunk_bytes=CHUNK)


def every_dtype(seed: int = 0) -> dict[str, object]:
    """One tensor per supported dtype, torch and numpy, with awkward shapes."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    return {
        "torch/float32": torch.randn(33, 17, generator=gen),
        "torch/float16": torch.randn(300, generator=gen).half(),
        "torch/bfloat16": torch.randn(5, 7, 11, generator=gen).bfloat16(),
        "torch/int64": torch.randint(-(2**40), 2**40, (129,), generator=gen),
        "torch/int32": torch.randint(-(2**31), 2**31 - 1, (3, 3), generator=gen, dtype=torch.int32),
        "torch/uint8": torch.randint(0, 256, (1500,), generator=gen, dtype=torch.uint8),
        "torch/bool": torch.rand(7, 9, generator=gen) > 0.5,
        "torch/scalar": torch.tensor(3.5),
        "torch/empty": torch.zeros(0, 4),
        "torch/noncontiguous": torch.randn(8, 6, generator=gen).t(),
        "numpy/float32": rng.standard_normal((40, 10)).astype(np.float32),
        "numpy/float16": rng.standard_normal(77).astype(np.float16),
        "numpy/int64": rng.integers(-(2**50), 2**50, 64),
        "numpy/int32": rng.integers(-1000, 1000, (4, 4)).astype(np.int32),
        "numpy/uint8": rng.integers(0, 256, 2049).astype(np.uint8),
        "numpy/bool": rng.random(100) > 0.3,
    }


def assert_same(loaded: torch.Tensor, original: object) -> None:
    expected = original if isinstance(original, torch.Tensor) else torch.from_numpy(np.asarray(original))
    assert loaded.dtype == expected.dtype
    assert loaded.shape == expected.shape
    assert torch.equal(loaded, expected.contiguous())


def first_chunk_path(store: CheckpointStore, tensor: str, step: int, index: int = 0):
    manifest = store.read_manifest(step)
    digest = manifest.tensors[tensor].chunks[index]
    return store.location + "/" + store.object_rel(digest)
