"""Fixtures shared by the evaluation tests: the hand-built run directory of hand_run.py, a tiny CLIP folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.evaluation.hand_run import build_evaluated_run
from tests.models.tiny_sd import tiny_clip_tokenizer_folder

IMAGE_SIZE = 16
MAX_TOKENS = 8  # the tiny tokenizer's and text encoder's length, special tokens included


@pytest.fixture
def evaluated_run(tmp_path) -> Path:
    return build_evaluated_run(tmp_path / "run")


@pytest.fixture(scope="session")
def make_evaluated_run():
    """`build_evaluated_run`, for fixtures of a wider scope than a test's."""
    return build_evaluated_run


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A CLIPModel with 2-layer, 32-wide text and vision towers, its tokenizer and image preprocessor."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel

    folder = tiny_clip_tokenizer_folder(tmp_path_factory.mktemp("clip") / "tiny-clip")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                          crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return folder
