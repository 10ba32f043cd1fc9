"""Architecture presets: tiny, digits and sd15 fill the shape keys a config leaves out."""

from __future__ import annotations

import pytest
import torch

from stablediff.config import ConfigError, load_config
from stablediff.config.schema import UNetConfig, VAEConfig
from stablediff.models.build import build_unet


def test_the_sd15_preset_is_the_stable_diffusion_1_5_unet():
    with torch.device("meta"):  # shapes only: no 3.4 GB of memory
        unet = build_unet(UNetConfig(preset="sd15"), latent_channels=4, latent_size=64, cross_attention_dim=768)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


def test_explicit_keys_win_over_the_preset():
    cfg = UNetConfig(preset="sd15", layers_per_block=1)
    assert cfg.layers_per_block == 1 and cfg.block_out_channels == [320, 640, 1280, 1280]


def test_the_bundled_sd15_recipe_uses_both_presets():
    config = load_config("sd15")
    assert config.vae.block_out_channels == [128, 256, 512, 512]
    assert config.unet.block_out_channels[0] == 320


def test_an_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("tiny", ["vae.preset=sd21"])


def test_presets_exist_for_both_components():
    for name in ("tiny", "digits", "sd15"):
        UNetConfig(preset=name)
        VAEConfig(preset=name)


def test_a_diffusers_config_file_gives_the_architecture(tmp_path):
    reference = build_unet(UNetConfig(preset="tiny"), 4, 8, 32)
    reference.save_config(tmp_path)
    unet = build_unet(UNetConfig(diffusers_config=str(tmp_path / "config.json")), 4, 16, 64)
    assert list(unet.config.block_out_channels) == list(reference.config.block_out_channels)
    assert unet.config.cross_attention_dim == 64 and unet.config.sample_size == 16  # follow the run


def test_a_missing_diffusers_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="unet.diffusers_config"):
        build_unet(UNetConfig(diffusers_config=str(tmp_path / "nope.json")), 4, 8, 32)
