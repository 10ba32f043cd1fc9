"""Validation loss at fixed timesteps with fixed noise: a low-variance signal to compare
checkpoints of one run (and pick the best), unlike the training loss whose random
timesteps make it jump from batch to batch.

Each listed timestep sees every held-out sample once, with noise drawn from a
private `torch.Generator(seed)` in a fixed order, so the number depends only on
the weights (not on the batch size, the global RNG or the call history). The loss
is the unweighted MSE in the model's own prediction space; compare values only
between runs with the same prediction_type and noise schedule.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DDPMScheduler

from stablediff.models.diffusion import check_timesteps, evenly_spaced_timesteps, per_sample_loss

DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)


@torch.no_grad()
def validation_loss(unet: torch.nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor,
                    text_embeddings: torch.Tensor, prediction_type: str,
                    timesteps: Sequence[int] | int = DEFAULT_TIMESTEPS, seed: int = 1234,
                    batch_size: int = 64) -> dict:
    """{"loss": mean over timesteps, "per_timestep": {t: mean over samples}}.

    latents (N, C, h, w), already scaled like training latents; text_embeddings (N, L, D).
    `timesteps` is a list, or a count of evenly spaced ones (5 of 1000 -> 100, 300, ..., 900).
    The model is evaluated in eval mode and put back in the mode it was in.
    """
    num_train_timesteps = scheduler.config.num_train_timesteps
    if isinstance(timesteps, int):
        timesteps = evenly_spaced_timesteps(timesteps, num_train_timesteps)
    check_timesteps(timesteps, num_train_timesteps)
    if len(latents) == 0 or len(latents) != len(text_embeddings):
        raise ValueError(f"validation needs as many text embeddings as latents (>0); got {len(latents)} latents "
                         f"and {len(text_embeddings)} embeddings")
    if batch_size < 1:
        raise ValueError(f"validation batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    was_training = unet.training
    unet.eval()
    try:
        per_timestep = {}
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator).to(device=latents.device, dtype=latents.dtype)
            losses = []
            for start in range(0, len(latents), batch_size):
                part = slice(start, start + batch_size)
                steps = torch.full((len(latents[part]),), int(t), dtype=torch.long, device=latents.device)
                losses.append(per_sample_loss(unet, scheduler, latents[part], text_embeddings[part], noise[part],
                                              steps, prediction_type))
            per_timestep[int(t)] = torch.cat(losses).mean().item()
    finally:
        unet.train(was_training)
    return {"loss": sum(per_timestep.values()) / len(per_timestep), "per_timestep": per_timestep}
