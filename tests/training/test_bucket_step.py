"""Bucket sides follow the VAE's downscale, read from the config or a pretrained VAE folder."""

from __future__ import annotations

import json

import pytest

from stablediff.config import ConfigError, load_config
from stablediff.config.schema import VAEConfig
from stablediff.training.encoded_dataset import bucket_step


def test_the_step_is_eight_times_the_configured_vae_downscale():
    assert bucket_step(VAEConfig(block_out_channels=[8, 16, 32, 32], norm_num_groups=8)) == 64


def test_a_pretrained_vae_inside_a_pipeline_folder_is_found(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    assert bucket_step(VAEConfig(pretrained=str(tmp_path))) == 64


def test_a_pretrained_vae_config_without_channels_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot read block_out_channels"):
        bucket_step(VAEConfig(pretrained=str(tmp_path)))


def test_crop_variants_without_random_crop_are_refused():
    with pytest.raises(ConfigError, match="crop_variants = 4 needs data.crop: random"):
        load_config("tiny", ["data.crop_variants=4"])


def test_an_empty_bucket_list_is_refused():
    with pytest.raises(ConfigError, match="at least one \\[width, height\\] pair"):
        load_config("tiny", ["data.buckets=[]"])
