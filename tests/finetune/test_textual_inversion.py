"""Textual inversion: only the new vectors train, for a CLIP and a BERT/MiniLM text encoder."""

from pathlib import Path

import pytest
import torch

from stablediff.errors import ConfigError
from stablediff.finetune.textual_inversion import TextualInversion
from stablediff.models.text_encoder import TextEncoder, load_text_encoder

from tests.models.tiny_sd import tiny_clip_pipeline

# init tokens each tokenizer reads as one known token (the tiny CLIP vocabulary is single characters)
INIT = {"clip": "a", "bert": "dog"}


def encoder_of(kind: str, tmp_path: Path) -> TextEncoder:
    if kind == "bert":
        return load_text_encoder("minilm", max_length=8)
    pipe = tiny_clip_pipeline(tmp_path / "clip-tokenizer")
    return TextEncoder(pipe.tokenizer, pipe.text_encoder.requires_grad_(False), "tiny-clip")


@pytest.fixture(params=["clip", "bert"])
def encoder(request, tmp_path) -> TextEncoder:
    encoder = encoder_of(request.param, tmp_path)
    encoder.kind = request.param
    return encoder


def frozen_copy(encoder: TextEncoder) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in encoder.model.state_dict().items()}


def test_captions_without_the_token_encode_as_the_text_encoder_does(encoder):
    captions = ["a photo", "ok"]
    before = encoder.encode(captions)
    inversion = TextualInversion(encoder.tokenizer, encoder.model, "<tok>", INIT[encoder.kind], num_vectors=2)
    assert torch.equal(inversion.encode(captions), before)
    assert torch.equal(encoder.encode(captions), before)


def test_the_new_vectors_start_as_the_init_token_and_are_what_the_encoder_reads(encoder):
    width = encoder.hidden_size
    init_id = encoder.tokenizer(INIT[encoder.kind], add_special_tokens=False).input_ids[0]
    init_row = encoder.model.get_input_embeddings().weight[init_id].clone()
    inversion = TextualInversion(encoder.tokenizer, encoder.model, "<tok>", INIT[encoder.kind], num_vectors=3)
    assert inversion.vectors().shape == (3, width)
    assert torch.equal(inversion.vectors(), init_row.expand(3, -1))
    assert encoder.tokenizer.tokenize("<tok> <tok>_1 <tok>_2") == ["<tok>", "<tok>_1", "<tok>_2"]
    assert inversion.expand(["a <tok>"]) == ["a <tok> <tok>_1 <tok>_2"]
    # a vector set by hand is what the caption's three positions now read
    with torch.no_grad():
        inversion.learned.copy_(torch.randn(3, width, generator=torch.Generator().manual_seed(0)))
    input_ids = encoder.tokenizer(inversion.expand(["<tok>"]), return_tensors="pt").input_ids
    spelled = encoder.model.get_input_embeddings()(input_ids)
    first = 1  # after the start token ([CLS] / <|startoftext|>)
    assert torch.equal(spelled[0, first:first + 3], inversion.vectors())


def test_only_the_new_vectors_change_through_adamw_with_weight_decay(encoder):
    inversion = TextualInversion(encoder.tokenizer, encoder.model, "<tok>", INIT[encoder.kind], num_vectors=2)
    frozen = frozen_copy(encoder)
    start = inversion.vectors()
    optimizer = torch.optim.AdamW(inversion.parameters(), lr=0.1, weight_decay=0.01)
    target = torch.randn(2, 8, encoder.hidden_size, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        loss = (inversion.encode(["<tok> in a box", "a photo"]) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert [p.shape for p in inversion.parameters()] == [(2, encoder.hidden_size)]
    assert not torch.equal(inversion.vectors(), start)
    after = encoder.model.state_dict()
    assert sorted(after) == sorted(frozen)
    for name, tensor in frozen.items():
        assert torch.equal(after[name], tensor), name  # the whole matrix too, new rows included
    assert all(p.grad is None for p in encoder.model.parameters())


def test_state_dict_holds_only_the_vectors_and_loads_back(encoder):
    inversion = TextualInversion(encoder.tokenizer, encoder.model, "<tok>", INIT[encoder.kind], num_vectors=2)
    state = inversion.state_dict()
    assert list(state) == ["vectors"] and state["vectors"].shape == (2, encoder.hidden_size)
    trained = torch.full_like(state["vectors"], 0.25)
    inversion.load_state_dict({"vectors": trained})
    assert torch.equal(inversion.vectors(), trained)
    with pytest.raises(ValueError, match="shape"):
        inversion.load_state_dict({"vectors": torch.zeros(3, encoder.hidden_size)})


def test_remove_detaches_the_vectors_from_the_encoder(encoder):
    inversion = TextualInversion(encoder.tokenizer, encoder.model, "<tok>", INIT[encoder.kind])
    initial = inversion.encode(["<tok>"])
    with torch.no_grad():
        inversion.learned.add_(1.0)
    assert not torch.equal(inversion.encode(["<tok>"]), initial)
    inversion.remove()
    assert torch.equal(inversion.encode(["<tok>"]), initial)


@pytest.mark.parametrize("kind, token, init_token, message", [
    ("bert", "<tok>", "dog house", "reads it as 2 tokens"),
    ("bert", "<tok>", "\u2603\u2603", "does not know it"),
    ("bert", "dog", "cat", "'dog' is already a token of the tokenizer"),
    ("bert", "my tok", "cat", "holds a space"),
    ("clip", "<tok>", "dog", "reads it as 3 tokens"),
    ("bert", "Dog", "cat", "already a word the tokenizer knows .it reads it as .dog."),
    ("clip", "<tok>", "\u00e9", "does not know it"),
], ids=["bert-two-tokens", "bert-unknown", "bert-existing", "bert-space", "clip-three-tokens", "bert-known-word",
        "clip-unknown"])
def test_a_bad_token_or_init_token_is_one_config_error(kind, token, init_token, message, tmp_path):
    encoder = encoder_of(kind, tmp_path)
    with pytest.raises(ConfigError, match=message) as caught:
        TextualInversion(encoder.tokenizer, encoder.model, token, init_token)
    assert "\n" not in str(caught.value)
