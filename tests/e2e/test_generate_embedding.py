"""`stablediff generate --embedding FILE` as a user runs it: the word works, the PNG records it, errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from stablediff.inference.embedding_files import save_embedding

from tests.conftest import run_cli
from tests.inference.tiny import build_tiny_pipeline_folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("generate-embedding") / "tiny-model")


def vectors(num: int, width: int = 384) -> torch.Tensor:
    return torch.randn(num, width, generator=torch.Generator().manual_seed(3))


def generate(*args):
    result = run_cli("generate", *map(str, args))
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.endswith(".png")]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_an_embedding_word_changes_the_image_and_from_png_makes_it_again(model, tmp_path):
    path = save_embedding(tmp_path / "ink-style.safetensors", "ink-style", vectors(2))
    common = ("--steps", "2", "--seed", "4", "--negative", "ink-style")
    plain = generate(model, "a digit in ink-style", *common, "--out", tmp_path / "plain")
    made = generate(model, "a digit in ink-style", *common, "--embedding", path, "--out", tmp_path / "a")
    assert not np.array_equal(pixels(made[0]), pixels(plain[0]))
    assert 'TI hashes: "ink-style: ' in Image.open(made[0]).text["parameters"]
    again = generate("--from-png", made[0], "--out", tmp_path / "b")
    assert np.array_equal(pixels(again[0]), pixels(made[0]))


def test_a_trusted_pickle_embedding_loads(model, tmp_path):
    torch.save({"string_to_param": {"*": vectors(1)}, "name": "x"}, tmp_path / "pen-nib.pt")
    save_embedding(tmp_path / "pen-nib.safetensors", "pen-nib", vectors(1))
    from_pickle = generate(model, "a pen-nib digit", "--steps", "2", "--embedding", tmp_path / "pen-nib.pt",
                           "--trust-pickle", "--out", tmp_path / "a")
    from_safetensors = generate(model, "a pen-nib digit", "--steps", "2", "--embedding",
                                tmp_path / "pen-nib.safetensors", "--out", tmp_path / "b")
    assert np.array_equal(pixels(from_pickle[0]), pixels(from_safetensors[0]))


@pytest.mark.parametrize("file, message", [
    ("missing.safetensors", "embedding {tmp}/missing.safetensors does not exist"),
    ("sd2-style.safetensors", "has vectors 1024 wide and this model's text encoder (BertModel) takes 384-wide"),
    ("a1111.pt", "is a pickle-based checkpoint (zip format); loading it can run arbitrary code"),
    ("cut.safetensors", "not a readable safetensors file"),
])
def test_a_bad_embedding_is_one_paragraph_and_exit_1(model, tmp_path, file, message):
    save_embedding(tmp_path / "sd2-style.safetensors", "sd2-style", torch.zeros(1, 1024))
    torch.save({"string_to_param": {"*": torch.zeros(1, 384)}}, tmp_path / "a1111.pt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    result = run_cli("generate", str(model), "x", "--steps", "2", "--embedding", str(tmp_path / file),
                     "--out", str(tmp_path / "o"))
    assert result.returncode == 1, result.stderr
    assert message.format(tmp=tmp_path) in " ".join(result.stderr.split()) and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()
