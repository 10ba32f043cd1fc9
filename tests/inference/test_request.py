"""A generation request and its infotext: one image's text gives back the request that makes it."""

from pathlib import Path

import pytest

from stablediff.inference.lora import LoraSpec
from stablediff.inference.metadata import parse_infotext
from stablediff.inference.request import (GenerationRequest, infotext_for, lora_weights,
                                          request_from_infotext)


def test_image_i_of_a_call_is_the_request_with_seed_plus_i():
    request = GenerationRequest("a digit", seed=10, num=4)
    assert request.for_image(3, (32, 32)) == GenerationRequest("a digit", seed=13, num=1, size=(32, 32))


def test_infotext_gives_back_the_request():
    lora = LoraSpec(Path("/loras/ink.safetensors"), 0.6)
    request = GenerationRequest("a digit, bold", negative_prompt="blurry", steps=7, sampler="euler_a",
                                guidance_scale=4.5, seed=9, size=(32, 48), strength=0.35, loras=(lora,))
    text = infotext_for(request, "digits", "0123456789", {"ink": "abcdef0123"})
    assert "Denoising strength: 0.35" in text and 'Lora hashes: "ink: abcdef0123"' in text
    info = parse_infotext(text)
    assert lora_weights(info) == {"ink": ("abcdef0123", 0.6)}
    assert request_from_infotext(info, (lora,)) == request


def test_txt2img_infotext_has_no_denoising_strength():
    text = infotext_for(GenerationRequest("x", size=(16, 16)), "m", "0123456789", {})
    assert "Denoising strength" not in text and "Lora" not in text


def test_unreadable_parameters_are_a_clear_error():
    with pytest.raises(ValueError, match="need at least Steps, CFG scale, Seed and Size"):
        request_from_infotext(parse_infotext("x\nSteps: 2, Sampler: ddim, Seed: 1"))


def test_an_unknown_sampler_in_a_request_is_refused():
    with pytest.raises(ValueError, match="unknown sampler 'k_dpm'"):
        GenerationRequest("x", sampler="k_dpm")


def test_a_size_past_the_limit_is_refused():
    with pytest.raises(ValueError, match="99999x64 is past the limit of 4096 pixels a side"):
        GenerationRequest("x", size=(99999, 64))
    assert GenerationRequest("x", size=(4096, 4096)).size == (4096, 4096)
