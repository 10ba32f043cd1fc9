"""The bundled MiniLM text encoder: offline, and encoding exactly as diffusers' pipeline does."""

import os
import subprocess
import sys

import pytest
import torch

from stablediff.models.text_encoder import load_text_encoder


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder("minilm", max_length=12)


def test_embeddings_have_one_row_per_token_and_minilm_width(encoder):
    embeddings = encoder.encode(["a handwritten digit seven", ""])
    assert embeddings.shape == (2, 12, 384)
    assert torch.isfinite(embeddings).all()


def test_different_captions_give_different_embeddings(encoder):
    a, b = encoder.encode(["the number 1", "the number 7"])
    assert not torch.allclose(a, b)


def test_loads_with_the_hub_switched_off_in_a_fresh_process():
    code = ("from stablediff.models.text_encoder import load_text_encoder;"
            "print(load_text_encoder().encode(['hi']).shape)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-hf-home"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 16, 384])" in out.stdout


def test_matches_diffusers_prompt_encoding(encoder):
    from diffusers import StableDiffusionPipeline

    # encode_prompt only touches tokenizer and text encoder.
    pipe = StableDiffusionPipeline.__new__(StableDiffusionPipeline)
    pipe.tokenizer, pipe.text_encoder = encoder.tokenizer, encoder.model
    pipe._lora_scale = None
    theirs, _ = StableDiffusionPipeline.encode_prompt(pipe, "digit 3, handwritten", "cpu", 1, False)
    ours = encoder.encode(["digit 3, handwritten"])
    assert torch.equal(ours, theirs.float())


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_text_encoder(str(tmp_path))


def test_loading_leaves_the_environment_and_log_levels_as_they_were(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # conftest sets it; a library must not
    before = dict(os.environ)
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    try:
        load_text_encoder("minilm", max_length=12)
        assert dict(os.environ) == before
        assert hf_logging.get_verbosity() == hf_logging.INFO
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity(level)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
