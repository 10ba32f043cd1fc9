"""Pickle-based checkpoints are refused unless the user trusts them (DESIGN invariant 8)."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from stablediff.io.pickle_guard import PickleRefusedError, refuse_pickle


def test_torch_save_zip_file_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(PickleRefusedError, match=r"model.ckpt is a pickle-based checkpoint .*--trust-pickle"):
        refuse_pickle(path, trust_pickle=False)


def test_renamed_pickle_is_refused_by_its_bytes(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=4))
    with pytest.raises(PickleRefusedError, match="pickle format"):
        refuse_pickle(path)


def test_pickle_suffix_with_unrecognised_bytes_is_refused(tmp_path):
    path = tmp_path / "old.pt"
    path.write_bytes(b"(dp0\nS'w'\np1\n")  # protocol-0 pickle has no magic bytes
    with pytest.raises(PickleRefusedError):
        refuse_pickle(path)


def test_trusted_pickle_is_allowed(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert refuse_pickle(path, trust_pickle=True) == "zip"


def test_safetensors_passes_even_with_a_pickle_suffix(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.bin"
    save_file({"w": torch.ones(2)}, str(path))
    assert refuse_pickle(path) == "safetensors"


def test_a_protocol_0_pickle_under_any_name_is_refused(tmp_path):
    import pickle

    path = tmp_path / "weights.model"
    path.write_bytes(pickle.dumps({"w": [1.0]}, protocol=0))  # no magic bytes to recognise it by
    with pytest.raises(PickleRefusedError, match="pickle-based"):
        refuse_pickle(path)
