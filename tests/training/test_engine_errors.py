"""The training engine's own error paths: each says what is wrong and what to do."""

from __future__ import annotations

import json

import pytest
import torch

from stablediff.checkpoint import CheckpointError, CheckpointStore
from stablediff.config.schema import CheckpointConfig, UNetConfig
from stablediff.models.build import build_unet
from stablediff.training.checkpointing import RunCheckpointer
from stablediff.training.distributed import from_environment
from stablediff.training.precision import resolve_device


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_asking_for_cuda_without_a_gpu_names_the_alternatives():
    with pytest.raises(ValueError, match="no CUDA GPU.*'auto' or 'cpu'"):
        resolve_device("cuda")


def test_a_broken_torchrun_environment_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="set by torchrun"):
        from_environment()


def test_a_rollback_with_no_earlier_checkpoint_says_how_to_get_one(tmp_path):
    checkpointer = RunCheckpointer(CheckpointStore(tmp_path / "checkpoints"), [], CheckpointConfig(), print)
    try:
        with pytest.raises(CheckpointError, match="no checkpoint precedes it.*every_steps"):
            checkpointer.load_before(5)
    finally:
        checkpointer.close()


def test_a_diffusers_config_that_is_not_json_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        build_unet(UNetConfig(diffusers_config=str(tmp_path)), 4, 8, 32)


def test_a_diffusers_config_of_another_model_class_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="config of AutoencoderKL, not of a UNet2DConditionModel"):
        build_unet(UNetConfig(diffusers_config=str(tmp_path / "config.json")), 4, 8, 32)
