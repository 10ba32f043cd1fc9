"""Embedding files and `--embedding` at inference: layouts, splicing, idempotence, clear refusals."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stablediff.errors import GenerationError, ModelFileError
from stablediff.finetune.textual_inversion import TextualInversion
from stablediff.inference.embedding_files import read_embedding, save_embedding
from stablediff.inference.embeddings import EmbeddingSpec, apply_embeddings
from stablediff.inference.pipeline import images_to_array, txt2img
from stablediff.io.pickle_guard import PickleRefusedError

from tests.inference.conftest import pixels
from tests.models.tiny_sd import tiny_clip_pipeline, tiny_pipeline

INIT = {"clip": "a", "bert": "dog"}
PROMPT = {"clip": "a <tok>", "bert": "a photo of <tok>"}  # within the tiny encoders' 8 tokens, expanded


def make_pipe(kind: str, folder: Path):
    return tiny_clip_pipeline(folder) if kind == "clip" else tiny_pipeline()


def image(pipe, prompt: str, negative: str | None = None) -> np.ndarray:
    return images_to_array(txt2img(pipe, prompt, negative_prompt=negative, steps=2, seed=3, size=(16, 16)))


def known_vectors(num: int, width: int) -> torch.Tensor:
    return torch.randn(num, width, generator=torch.Generator().manual_seed(7))


def test_save_writes_one_token_tensor_that_reads_back_named_by_the_file(tmp_path):
    vectors = known_vectors(3, 16)
    path = save_embedding(tmp_path / "ink-style.safetensors", "<ink>", vectors, {"ss_steps": 40})
    with safe_open(path, "pt") as f:
        assert list(f.keys()) == ["<ink>"] and f.metadata() == {"ss_steps": "40", "format": "pt"}
    name, read = read_embedding(path)
    assert name == "ink-style" and torch.equal(read, vectors)  # A1111's rule: the file name stem is the word
    assert not list(tmp_path.glob("*.tmp-*"))


def test_the_common_layouts_are_read(tmp_path):
    vectors = known_vectors(2, 16)
    save_file({"emb_params": vectors}, tmp_path / "kohya.safetensors")
    torch.save({"string_to_param": {"*": vectors}, "name": "other", "step": 500}, tmp_path / "a1111.pt")
    torch.save({"<cat-toy>": vectors[0]}, tmp_path / "learned_embeds.bin")
    assert read_embedding(tmp_path / "kohya.safetensors")[0] == "kohya"
    assert torch.equal(read_embedding(tmp_path / "kohya.safetensors")[1], vectors)
    assert torch.equal(read_embedding(tmp_path / "a1111.pt", trust_pickle=True)[1], vectors)
    assert torch.equal(read_embedding(tmp_path / "learned_embeds.bin", trust_pickle=True)[1], vectors[:1])


def test_a_pickle_without_trust_and_files_of_other_kinds_are_refused(tmp_path):
    torch.save({"string_to_param": {"*": torch.zeros(1, 16)}}, tmp_path / "a1111.pt")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, tmp_path / "sdxl.safetensors")
    save_file({"a": torch.zeros(1, 8), "b": torch.zeros(1, 8)}, tmp_path / "two.safetensors")
    with pytest.raises(PickleRefusedError, match="pickle-based checkpoint.*--trust-pickle"):
        read_embedding(tmp_path / "a1111.pt")
    with pytest.raises(ModelFileError, match="SDXL embedding"):
        read_embedding(tmp_path / "sdxl.safetensors")
    with pytest.raises(ModelFileError, match="holds 2 tensors"):
        read_embedding(tmp_path / "two.safetensors")


@pytest.mark.parametrize("kind", ["clip", "bert"])
def test_an_embedding_file_generates_what_the_vectors_spliced_in_by_diffusers_do(kind, tmp_path):
    trained = make_pipe(kind, tmp_path / "trained")
    inversion = TextualInversion(trained.tokenizer, trained.text_encoder, "<tok>", INIT[kind], num_vectors=2)
    inversion.load_state_dict({"vectors": known_vectors(2, inversion.vectors().shape[1])})
    path = save_embedding(tmp_path / "<tok>.safetensors", inversion.token, inversion.vectors())
    ours = make_pipe(kind, tmp_path / "ours")
    without = image(ours, PROMPT[kind], "<tok>")
    apply_embeddings(ours, [EmbeddingSpec(path)])
    reference = make_pipe(kind, tmp_path / "reference")
    reference.load_textual_inversion(inversion.vectors(), token="<tok>")  # diffusers' own loader
    made = image(ours, PROMPT[kind], "<tok>")
    assert np.array_equal(made, image(reference, PROMPT[kind], "<tok>"))
    assert np.array_equal(made, image(trained, PROMPT[kind], "<tok>"))  # what training's samples show
    assert not np.array_equal(made, without)


def test_applying_is_idempotent_and_dropping_an_embedding_restores_the_model(tmp_path):
    pipe = tiny_pipeline()
    vocabulary, rows = len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().weight.clone()
    base = image(pipe, "a photo of <tok>")
    path = save_embedding(tmp_path / "<tok>.safetensors", "<tok>", known_vectors(3, 384))
    apply_embeddings(pipe, [EmbeddingSpec(path)])
    first = image(pipe, "a photo of <tok>")
    apply_embeddings(pipe, [EmbeddingSpec(path), EmbeddingSpec(path)])  # the same file twice: loaded once
    apply_embeddings(pipe, [EmbeddingSpec(path)])
    assert len(pipe.tokenizer) == vocabulary + 3
    assert np.array_equal(image(pipe, "a photo of <tok>"), first) and not np.array_equal(first, base)
    apply_embeddings(pipe, [])
    assert len(pipe.tokenizer) == vocabulary
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, rows)
    assert np.array_equal(image(pipe, "a photo of <tok>"), base)


def test_a_changed_file_under_the_same_name_replaces_the_vectors(tmp_path):
    pipe = tiny_pipeline()
    path = tmp_path / "<tok>.safetensors"
    save_embedding(path, "<tok>", known_vectors(2, 384))
    apply_embeddings(pipe, [EmbeddingSpec(path)])
    before = image(pipe, "a photo of <tok>")
    save_embedding(path, "<tok>", known_vectors(1, 384) * 3)
    apply_embeddings(pipe, [EmbeddingSpec(path)])
    assert "<tok>_1" not in pipe.tokenizer.get_vocab()
    assert not np.array_equal(image(pipe, "a photo of <tok>"), before)


def test_an_embedding_of_another_width_is_refused_naming_both(tmp_path):
    pipe = tiny_pipeline()
    path = save_embedding(tmp_path / "sd2-style.safetensors", "sd2-style", torch.zeros(1, 1024))
    with pytest.raises(GenerationError, match="1024 wide .* takes 384-wide") as caught:
        apply_embeddings(pipe, [EmbeddingSpec(path)])
    assert "\n" not in str(caught.value)


def test_two_different_files_of_one_name_are_refused(tmp_path):
    save_embedding(tmp_path / "a" / "<tok>.safetensors", "<tok>", torch.zeros(1, 384))
    save_embedding(tmp_path / "b" / "<tok>.safetensors", "<tok>", torch.ones(1, 384))
    specs = [EmbeddingSpec(tmp_path / folder / "<tok>.safetensors") for folder in "ab"]
    with pytest.raises(GenerationError, match="two different embedding files are named '<tok>'"):
        apply_embeddings(tiny_pipeline(), specs)


def test_a_file_named_as_a_known_word_is_refused(tmp_path):
    path = save_embedding(tmp_path / "dog.safetensors", "dog", torch.zeros(1, 384))
    with pytest.raises(GenerationError, match="'dog' is already a token.*rename the file"):
        apply_embeddings(tiny_pipeline(), [EmbeddingSpec(path)])


def test_the_python_api_takes_embeddings_and_records_them(loaded, tmp_path):
    path = save_embedding(tmp_path / "<ink>.safetensors", "<ink>", known_vectors(2, 384))
    plain = loaded.txt2img("a photo of <ink>", steps=2, seed=1)[0]
    made = loaded.txt2img("a photo of <ink>", steps=2, seed=1, embeddings=[path])[0]
    assert not np.array_equal(pixels(made), pixels(plain))
    assert 'TI hashes: "<ink>: ' in made.info["parameters"]
    assert np.array_equal(pixels(loaded.txt2img("a photo of <ink>", steps=2, seed=1)[0]), pixels(plain))
