"""Diffusion training targets and the loss of one step, as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


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
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use epsilon, v_prediction or sample")


def diffusion_loss(unet: torch.nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor,
                   text_embeddings: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   prediction_type: str) -> torch.Tensor:
    """Mean squared error between the network's prediction and its target.

    latents (B, C, h, w), text_embeddings (B, L, D), noise like latents, timesteps (B,).
    """
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, text_embeddings).sample
    target = training_target(scheduler, latents, noise, timesteps, prediction_type)
    return F.mse_loss(prediction.float(), target.float())
