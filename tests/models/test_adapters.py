"""models/adapters.py: what trains, loading it back onto a base, merging LoRA into plain weights."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from stablediff.errors import CheckpointError
from stablediff.models.adapters import attach_lora, load_trained, merged_copy, trained_tensors
from tests.models.tiny_sd import tiny_unet

LORA = {"r": 2, "lora_alpha": 4.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1",
                                                      "proj_in"]}


def lora_unet(seed: int = 0) -> UNet2DConditionModel:
    """The tiny UNet with adapters whose B is not zero (as after training), so merging has work to do."""
    unet = tiny_unet()
    attach_lora(unet, LORA)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return unet


def output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 3, 384, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), encoder_hidden_states=text).sample


def test_trained_tensors_are_exactly_the_parameters_that_train():
    unet = lora_unet()
    for name, param in unet.named_parameters():
        if name.startswith("up_blocks."):
            param.requires_grad_(False)
    tensors = trained_tensors(unet)
    expected = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert set(tensors) == expected and expected
    assert all("lora_" in n and not n.startswith("up_blocks.") for n in tensors)
    own = dict(unet.named_parameters())
    assert all(tensors[n].data_ptr() == own[n].data_ptr() for n in tensors)  # views: a snapshot copies them


def test_load_trained_puts_stored_tensors_back():
    source, target = lora_unet(seed=1), lora_unet(seed=2)
    stored = {n: t.detach().clone() for n, t in trained_tensors(source).items()}
    load_trained(target, stored, "ckpt step 4")
    assert torch.equal(output(target), output(source))


def test_load_trained_refuses_names_the_model_does_not_have():
    stored = {n: t.detach().clone() for n, t in trained_tensors(lora_unet()).items()}
    with pytest.raises(CheckpointError) as error:
        load_trained(tiny_unet(), stored, "ckpt step 4")  # a base without the adapters
    message = str(error.value)
    assert message.startswith("ckpt step 4: ") and ".lora_" in message and "another base model" in message


def test_load_trained_refuses_a_wrong_shape():
    unet = lora_unet()
    name = next(n for n in trained_tensors(unet) if ".lora_A." in n)
    before = dict(unet.named_parameters())[name].detach().clone()
    with pytest.raises(CheckpointError) as error:
        load_trained(unet, {name: torch.zeros(3, 3)}, "ckpt step 4")
    assert name in str(error.value) and "(3, 3)" in str(error.value)
    assert torch.equal(dict(unet.named_parameters())[name], before)


def test_merged_copy_gives_the_peft_models_output_without_peft_layers():
    from peft.tuners.lora import LoraLayer

    unet = lora_unet()
    merged = merged_copy(unet)
    assert type(merged) is UNet2DConditionModel
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert not any("lora_" in n or "base_layer" in n for n in merged.state_dict())
    assert sorted(merged.state_dict()) == sorted(tiny_unet().state_dict())
    assert torch.allclose(output(merged), output(unet), atol=1e-5)
    assert not torch.allclose(output(merged), output(tiny_unet()), atol=1e-3)  # the adapters changed something


def test_merged_copy_at_scale_zero_is_the_base():
    merged = merged_copy(lora_unet(), scale=0.0)
    assert torch.allclose(output(merged), output(tiny_unet()), atol=1e-6)


def text_encoder(kind: str, tmp_path):
    from stablediff.models.text_encoder import load_text_encoder
    from tests.models.tiny_sd import tiny_clip_pipeline

    if kind == "clip":
        pipe = tiny_clip_pipeline(tmp_path / "tokenizer")
        return pipe.tokenizer, pipe.text_encoder
    encoder = load_text_encoder("minilm", max_length=8)
    return encoder.tokenizer, encoder.model




@pytest.mark.parametrize("kind", ["clip", "bert"])
def test_a_text_encoders_adapters_merge_into_a_plain_copy_that_encodes_the_same(kind, tmp_path):
    from stablediff.models.text_encoder import encode_captions

    from stablediff.config.finetune import TEXT_ENCODER_TARGETS

    tokenizer, model = text_encoder(kind, tmp_path)
    attach_lora(model, {"r": 2, "lora_alpha": 3.0, "target_modules": list(TEXT_ENCODER_TARGETS[kind.upper()])})
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {n for n in model.state_dict() if "lora_" in n}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        adapted = encode_captions(tokenizer, model, ["a digit seven", "one"])
        merged = merged_copy(model)
        assert type(merged) is type(model) and not any("lora_" in n for n in merged.state_dict())
        assert torch.allclose(encode_captions(tokenizer, merged, ["a digit seven", "one"]), adapted, atol=1e-4)
        unadapted = encode_captions(tokenizer, merged_copy(model, scale=0.0), ["a digit seven", "one"])
        assert (unadapted - adapted).abs().max() > 1e-3  # the adapters matter: the comparison means something
