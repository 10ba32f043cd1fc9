"""LoRA at inference: diffusers/peft and kohya files, scales, mixing, and clear refusals."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stablediff.inference.lora import LoraSpec, parse_lora_arg

from tests.inference.conftest import pixels
from tests.inference.tiny import kohya_lora_tensors

PROMPT = "a handwritten digit four"


def make(loaded, loras=()):
    return pixels(loaded.txt2img(PROMPT, steps=2, seed=5, loras=list(loras))[0])


def test_parse_lora_arg_reads_an_optional_scale(peft_lora, kohya_lora):
    assert parse_lora_arg(f"{kohya_lora}:0.5") == LoraSpec(kohya_lora, 0.5)
    assert parse_lora_arg(str(kohya_lora)) == LoraSpec(kohya_lora, 1.0)
    assert parse_lora_arg(f"{peft_lora.parent}:-1").path == peft_lora  # a save_lora_weights folder
    assert parse_lora_arg(f"{peft_lora.parent}:-1").name == "peft-lora"


@pytest.mark.parametrize("lora", ["peft_lora", "kohya_lora"])
def test_scale_zero_is_no_lora_and_a_nonzero_scale_changes_the_image(loaded, lora, request):
    path = request.getfixturevalue(lora)
    base = make(loaded)
    assert np.array_equal(make(loaded, [(path, 0.0)]), base)
    assert np.abs(make(loaded, [(path, 1.0)]) - base).max() > 0


def test_two_loras_mix_and_removing_them_restores_the_model(loaded, peft_lora, kohya_lora):
    base = make(loaded)
    one = make(loaded, [(peft_lora, 1.0)])
    both = make(loaded, [(peft_lora, 1.0), (kohya_lora, 1.0)])
    assert not np.array_equal(one, both)
    assert np.array_equal(make(loaded, [(peft_lora, 1.0)]), one)  # kohya adapter dropped again
    assert np.array_equal(make(loaded), base)


def test_a_lora_for_another_model_is_refused(loaded, tmp_path):
    path = tmp_path / "sd15_lora.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # our block 0 has no attention
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 320), f"{name}.lora_up.weight": torch.zeros(320, 4)},
              path)
    with pytest.raises(ValueError, match="does not fit this model.*no layer down_blocks.0.attentions.0"):
        loaded.txt2img(PROMPT, steps=2, loras=[str(path)])


def test_a_lora_of_the_wrong_width_is_refused(loaded, tiny_model, tmp_path):
    tensors = kohya_lora_tensors(tiny_model)
    key = next(k for k in tensors if k.endswith("lora_down.weight"))
    tensors[key] = torch.zeros(4, 7)
    save_file(tensors, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="does not fit this model.*shape"):
        loaded.txt2img(PROMPT, steps=2, loras=[str(tmp_path / "wide.safetensors")])


def test_a_truncated_lora_is_refused(loaded, kohya_lora, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(kohya_lora.read_bytes()[:300])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        loaded.txt2img(PROMPT, steps=2, loras=[str(path)])


def test_a_text_encoder_lora_is_refused_for_minilm(loaded, tiny_model, tmp_path):
    tensors = kohya_lora_tensors(tiny_model)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    tensors |= {f"{te}.lora_down.weight": torch.zeros(4, 384), f"{te}.lora_up.weight": torch.zeros(384, 4)}
    save_file(tensors, tmp_path / "with_te.safetensors")
    with pytest.raises(ValueError, match="also changes the text_encoder.*BertModel"):
        loaded.txt2img(PROMPT, steps=2, loras=[str(tmp_path / "with_te.safetensors")])


def test_pickle_and_missing_loras_are_refused(tmp_path):
    (tmp_path / "old.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="only .safetensors"):
        parse_lora_arg(str(tmp_path / "old.pt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_lora_arg(str(tmp_path / "none.safetensors:0.5"))


def test_a_scale_that_is_no_number_is_named_as_the_problem(kohya_lora):
    with pytest.raises(ValueError, match="the scale 'abc' is not a number; give PATH:SCALE"):
        parse_lora_arg(f"{kohya_lora}:abc")


def test_a_model_file_given_as_a_lora_is_said_to_be_no_lora(loaded, tiny_model):
    unet_weights = tiny_model / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ValueError, match="is not a LoRA: none of its .* tensors is a LoRA tensor"):
        loaded.txt2img(PROMPT, steps=2, loras=[str(unet_weights)])


def test_a_pickle_named_safetensors_is_refused_as_a_pickle(loaded, tmp_path):
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "renamed.safetensors")
    with pytest.raises(ValueError, match=r"pickle-based checkpoint \(zip format\)"):
        loaded.txt2img(PROMPT, steps=2, loras=[str(tmp_path / "renamed.safetensors")])
