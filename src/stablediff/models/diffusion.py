"""The diffusion forward process: noise schedules, what a network learns to predict, and the
per-sample loss at given timesteps.

Training (training/objectives.py: timestep sampling, loss weights, offset noise),
validation (evaluation/val_loss.py) and model building (models/build.py) all
read these, so they live with the models rather than with the trainer.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DDPMScheduler

from stablediff.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def make_noise_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
                         beta_end: float = 0.02, prediction_type: str = "epsilon",
                         rescale_zero_terminal_snr: bool = False) -> DDPMScheduler:
    """The training noise schedule: linear (DDPM), scaled_linear (Stable Diffusion) or
    squaredcos_cap_v2 (cosine, Nichol & Dhariwal 2021), optionally rescaled to zero terminal
    SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed").

    With zero terminal SNR, x_T is pure noise, so an epsilon model learns nothing at t = T and
    sampling divides by sqrt(alpha_bar_T) = 0: that combination is refused (use v_prediction,
    as the paper does). The "trailing" spacing the paper pairs with it is stored in the config,
    so inference schedulers built from it start at t = T.
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ConfigError(f"noise.beta_schedule {beta_schedule!r} is not supported; use one of {BETA_SCHEDULES}")
    check_prediction_type(prediction_type)
    if rescale_zero_terminal_snr and prediction_type == "epsilon":
        raise ConfigError("noise.rescale_zero_terminal_snr needs train.prediction_type v_prediction (or sample): "
                          "at zero terminal SNR an epsilon model cannot recover the image at t = T "
                          "(Lin et al. 2023). Set train.prediction_type=v_prediction.")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
        beta_end=beta_end, prediction_type=prediction_type, clip_sample=False, steps_offset=1,
        rescale_betas_zero_snr=rescale_zero_terminal_snr,
        timestep_spacing="trailing" if rescale_zero_terminal_snr else "leading",
    )


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the network learns to predict: the noise (DDPM), the velocity v (Salimans &
    Ho 2022, "Progressive Distillation") or the clean sample x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ConfigError(f"unknown prediction_type {prediction_type!r}; use epsilon, v_prediction or sample")


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at each timestep, (B,) float32."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    alpha_bar = alphas_cumprod[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


def per_sample_loss(unet: torch.nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor,
                    text_embeddings: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """Unweighted mean squared error of each sample (B,), float32.

    latents (B, C, h, w), text_embeddings (B, L, D), noise like latents, timesteps (B,).
    """
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, text_embeddings).sample
    target = training_target(scheduler, latents, noise, timesteps, prediction_type)
    squared = (prediction.float() - target.float()) ** 2
    return squared.flatten(1).mean(dim=1)


def evenly_spaced_timesteps(count: int, num_train_timesteps: int) -> tuple[int, ...]:
    """`count` timesteps at the centres of equal slices of [0, T): 5 of 1000 -> 100, 300, ..., 900."""
    if not 1 <= count <= num_train_timesteps:
        raise ConfigError(f"asked for {count} evenly spaced timesteps; choose 1 to {num_train_timesteps}")
    return tuple(int((2 * i + 1) * num_train_timesteps // (2 * count)) for i in range(count))


def check_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> None:
    bad = [t for t in timesteps if not 0 <= int(t) < num_train_timesteps]
    if bad:
        raise ConfigError(f"timesteps {bad} are outside [0, {num_train_timesteps}); pick values in that range")


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"train.prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
