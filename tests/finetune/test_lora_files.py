"""LoRA files from a fine-tune checkpoint: the kohya layout loads in diffusers as the same model, with its metadata."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from stablediff.finetune.lora_files import load_lora_checkpoint, write_diffusers_lora, write_kohya_lora

from tests.finetune.lora_fixtures import (ATTENTION, CLIP_TARGETS, LOCON, add_trained_lora, build_sd_shaped_folder,
                                          image, lora_checkpoint, lora_config_meta)

RANK, ALPHA = 4, 2.0  # alpha != rank: a file whose alpha were lost or ignored would give another image


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_sd_shaped_folder(tmp_path_factory.mktemp("lora-files") / "base")


def load(base):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(base, safety_checker=None, local_files_only=True)


def trained_pipeline(base, targets, te_targets=None, use_dora=False):
    """The base pipeline with peft adapters on its UNet (and text encoder): what the fine-tune trained."""
    pipe = load(base)
    add_trained_lora(pipe.unet, targets, RANK, ALPHA, seed=1, use_dora=use_dora)
    if te_targets:
        add_trained_lora(pipe.text_encoder, te_targets, 2, 3.0, seed=2)
    return pipe


def checkpoint_of(pipe, run_dir, te=False, use_dora=False, meta=None):
    config = lora_config_meta(RANK, ALPHA, LOCON, use_dora)
    if te:
        config["text_encoder"] = {"r": 2, "lora_alpha": 3.0, "target_modules": CLIP_TARGETS}
    groups = {"unet": pipe.unet, **({"text_encoder": pipe.text_encoder} if te else {})}
    return load_lora_checkpoint(lora_checkpoint(run_dir, groups, {"lora_config": config, **(meta or {})}))


@pytest.mark.parametrize("targets", [ATTENTION, LOCON], ids=["lora", "locon"])
def test_a_kohya_file_loaded_by_diffusers_gives_the_trained_models_image(base, tmp_path, targets):
    trained = trained_pipeline(base, targets)
    out = write_kohya_lora(checkpoint_of(trained, tmp_path / "run"), tmp_path / "x.safetensors", "the run")
    fresh = load(base)
    before = image(fresh)
    fresh.load_lora_weights(str(out))
    expected = image(trained)
    assert abs(expected - before).max() > 8  # the LoRA changes the image, so the comparison means something
    assert abs(image(fresh) - expected).max() <= 1


def test_a_text_encoder_lora_is_written_as_lora_te_and_loads_as_trained(base, tmp_path):
    trained = trained_pipeline(base, ATTENTION, CLIP_TARGETS)
    out = write_kohya_lora(checkpoint_of(trained, tmp_path / "run", te=True), tmp_path / "te.safetensors", "run")
    keys = load_file(out)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert keys["lora_te_text_model_encoder_layers_1_mlp_fc2.alpha"].item() == 3.0
    fresh = load(base)
    fresh.load_lora_weights(str(out))
    assert abs(image(fresh) - image(trained)).max() <= 1


def test_every_module_gets_down_up_and_a_0d_alpha(base, tmp_path):
    trained = trained_pipeline(base, ATTENTION)
    tensors = load_file(write_kohya_lora(checkpoint_of(trained, tmp_path / "run"), tmp_path / "a.safetensors", "r"))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{name}.lora_down.weight"].shape == (RANK, 16)
    assert tensors[f"{name}.lora_up.weight"].shape == (16, RANK)
    bases = {k.split(".")[0] for k in tensors}
    assert len(bases) == sum(".lora_A." in k for k in trained.unet.state_dict()) == 6 * 8  # 6 attention blocks
    for b in bases:
        assert tensors[f"{b}.alpha"].dim() == 0 and tensors[f"{b}.alpha"].item() == ALPHA

