"""The validation set: held-out images with their own captions, fixed for the whole run."""

from __future__ import annotations

import pytest
import torch

from stablediff.config.schema import DataConfig
from stablediff.data.training_set import load_training_data
from stablediff.models.text_encoder import load_text_encoder
from stablediff.training.periodic import VALIDATION_SAMPLES, make_validation_set


@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder("minilm", max_length=8)


def test_the_digits_held_out_split_carries_one_caption_per_image(tmp_path):
    data = load_training_data(DataConfig(resolution=16, limit=8), seed=0, run_dir=tmp_path, bucket_step=8,
                              log=lambda _: None)
    assert len(data.held_out_captions) == len(data.held_out) == 359
    assert data.held_out_captions[0].startswith("a handwritten digit")


def test_validation_embeddings_are_those_of_the_held_out_captions(text_encoder):
    images = torch.zeros(3, 3, 16, 16)
    vset = make_validation_set(None, images, text_encoder, 1.0, ["a handwritten digit one", "the number 7", ""])
    expected = text_encoder.encode(["a handwritten digit one", "the number 7", ""])
    torch.testing.assert_close(vset.text_embeddings, expected)


def test_images_without_a_caption_are_validated_unconditionally(text_encoder):
    images = torch.zeros(VALIDATION_SAMPLES + 5, 3, 16, 16)
    vset = make_validation_set(None, images, text_encoder, 1.0, ["the number 7"])
    assert len(vset.latents) == len(vset.text_embeddings) == VALIDATION_SAMPLES
    empty = text_encoder.encode([""])[0]
    torch.testing.assert_close(vset.text_embeddings[1], empty)
    assert not torch.equal(vset.text_embeddings[0], empty)
