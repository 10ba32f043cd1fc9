"""One tiny pipeline folder and its LoRA files for all inference tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.inference.tiny import build_tiny_pipeline_folder, kohya_lora_tensors, write_peft_lora


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("inference") / "tiny-model")


@pytest.fixture(scope="session")
def loaded(tiny_model):
    from stablediff.inference.api import load_pipeline

    return load_pipeline(tiny_model)


@pytest.fixture(scope="session")
def peft_lora(tiny_model, tmp_path_factory) -> Path:
    return write_peft_lora(tiny_model, tmp_path_factory.mktemp("lora") / "peft-lora")


@pytest.fixture(scope="session")
def kohya_lora(tiny_model, tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("lora") / "kohya_style.safetensors"
    save_file(kohya_lora_tensors(tiny_model), path)
    return path


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)
