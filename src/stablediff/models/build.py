"""Build diffusers components from the typed config: VAE, UNet, noise scheduler."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from stablediff.config.schema import NoiseConfig, UNetConfig, VAEConfig
from stablediff.models.diffusion import make_noise_scheduler
from stablediff.errors import ConfigError, MissingPathError
from stablediff.models.weights_guard import check_model_folder


def build_vae(cfg: VAEConfig, resolution: int, trust_pickle: bool = False) -> AutoencoderKL:
    if cfg.pretrained:
        return load_vae(cfg.pretrained, trust_pickle)
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups, sample_size=resolution,
    )


def vae_folder(folder: str) -> Path:
    """The diffusers VAE folder `vae.pretrained` names: the folder itself, or a pipeline's vae/."""
    path = Path(folder).expanduser()
    for candidate in (path, path / "vae"):
        if (candidate / "config.json").is_file():
            return candidate
    raise MissingPathError(f"vae.pretrained: no diffusers VAE (config.json) in {path} or {path / 'vae'}")


def load_vae(folder: str, trust_pickle: bool = False) -> AutoencoderKL:
    path = vae_folder(folder)
    check_model_folder(path, trust_pickle)
    return AutoencoderKL.from_pretrained(path, local_files_only=True)


def downscale_factor(block_out_channels) -> int:
    """Pixels per latent cell of a VAE encoder (or a UNet) with these levels: each level but the last halves."""
    return 2 ** (len(block_out_channels) - 1)


def vae_downscale(vae: AutoencoderKL) -> int:
    return downscale_factor(vae.config.block_out_channels)


def build_unet(cfg: UNetConfig, latent_channels: int, latent_size: int, cross_attention_dim: int) -> UNet2DConditionModel:
    """From the shape keys (or a preset), or from `cfg.diffusers_config`. Channels, sample size and the
    cross-attention width always follow the VAE and text encoder the run actually uses."""
    fixed = dict(sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
                 cross_attention_dim=cross_attention_dim)
    if cfg.diffusers_config:
        return UNet2DConditionModel.from_config({**read_unet_config(cfg.diffusers_config), **fixed})
    return UNet2DConditionModel(
        down_block_types=tuple(cfg.down_block_types), up_block_types=tuple(cfg.up_block_types),
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim, norm_num_groups=cfg.norm_num_groups, **fixed,
    )


def read_unet_config(path: str) -> dict:
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise MissingPathError(f"unet.diffusers_config: {file} does not exist; give a diffusers UNet "
                               "config.json (or the folder holding it)") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"unet.diffusers_config: {file} is not valid JSON ({exc})") from None
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ConfigError(f"unet.diffusers_config: {file} is the config of {config['_class_name']}, "
                          "not of a UNet2DConditionModel; give the UNet's config.json (the unet/ folder)")
    return config


def build_noise_scheduler(cfg: NoiseConfig, prediction_type: str) -> DDPMScheduler:
    """The config's training noise schedule; the rules live in models/diffusion.py (one place)."""
    return make_noise_scheduler(cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end,
                                prediction_type, cfg.rescale_zero_terminal_snr)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
