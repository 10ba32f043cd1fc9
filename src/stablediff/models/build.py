"""Build diffusers components from the typed config: VAE, UNet, noise scheduler."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from stablediff.config.schema import NoiseConfig, UNetConfig, VAEConfig
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


def load_vae(folder: str, trust_pickle: bool = False) -> AutoencoderKL:
    path = Path(folder).expanduser()
    for candidate in (path, path / "vae"):
        if (candidate / "config.json").is_file():
            check_model_folder(candidate, trust_pickle)
            return AutoencoderKL.from_pretrained(candidate, local_files_only=True)
    raise FileNotFoundError(f"vae.pretrained: no diffusers VAE (config.json) in {path} or {path / 'vae'}")


def vae_downscale(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def build_unet(cfg: UNetConfig, latent_channels: int, latent_size: int, cross_attention_dim: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=tuple(cfg.down_block_types), up_block_types=tuple(cfg.up_block_types),
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cross_attention_dim, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
    )


def build_noise_scheduler(cfg: NoiseConfig, prediction_type: str) -> DDPMScheduler:
    """The config's training noise schedule; the rules live in training.objectives (one place)."""
    from stablediff.training.objectives import make_noise_scheduler

    return make_noise_scheduler(cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end,
                                prediction_type, cfg.rescale_zero_terminal_snr)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
