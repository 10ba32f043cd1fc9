"""Infotext written and read back in A1111's form; AutoV2 hashes."""

import hashlib

import pytest
from PIL import Image

from stablediff.inference.metadata import (file_short_hash, infotext, parse_infotext, png_info,
                                           read_png_metadata)


def test_infotext_round_trips_prompts_and_quoted_values():
    params = {"Steps": 20, "Sampler": "dpmpp_2m", "CFG scale": 7.5, "Seed": 1, "Size": "32x32",
              "Lora hashes": "a: 0123456789, b: abcdef0123", "Model": 'odd "name", v2'}
    text = infotext("a cat, sitting\non two lines", "blurry, low quality", params)
    parsed = parse_infotext(text)
    assert parsed.prompt == "a cat, sitting\non two lines"
    assert parsed.negative_prompt == "blurry, low quality"
    assert parsed.params == {k: str(v) for k, v in params.items()}


def test_parses_an_a1111_infotext():
    text = ("masterpiece, a castle\nNegative prompt: ugly\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, "
            'CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Model: v1-5, '
            'Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.9.4')
    parsed = parse_infotext(text)
    assert parsed.prompt == "masterpiece, a castle" and parsed.negative_prompt == "ugly"
    assert parsed.params["Schedule type"] == "Karras" and parsed.params["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert parsed.params["Version"] == "v1.9.4"


def test_a_prompt_without_parameters_is_only_a_prompt():
    parsed = parse_infotext("just a prompt, style: anime")
    assert parsed.prompt == "just a prompt, style: anime" and parsed.params == {}


def test_file_short_hash_is_autov2(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights" * 1000)
    assert file_short_hash(path) == hashlib.sha256(b"weights" * 1000).hexdigest()[:10]


def test_png_metadata_is_read_back(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path, pnginfo=png_info("p\nSteps: 2, Seed: 1, Size: 4x4", {"model": "/m"}))
    info, locations = read_png_metadata(path)
    assert info.prompt == "p" and info.params["Seed"] == "1" and locations == {"model": "/m"}


def test_a_png_without_parameters_is_refused_with_a_reason(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(ValueError, match="no `parameters` text chunk"):
        read_png_metadata(path)
