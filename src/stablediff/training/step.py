"""One optimizer step's math: the random draws of a step, and gradients over micro-batches.

A step of `batch_size x gradient_accumulation_steps` samples draws all of its
randomness at once from generators seeded by (seed, step, rank), then splits the
batch into micro-batches. So accumulation changes only how the gradient is
summed, never which samples, noise or timesteps a step sees: 4 micro-batches
of 8 give the gradient of one batch of 32 (up to float summation order).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from stablediff.config.schema import TrainConfig
from stablediff.training import objectives
from stablediff.training.precision import Precision
from stablediff.training.seeding import step_generator


@dataclass
class StepBatch:
    latents: torch.Tensor  # (N, C, h, w), scaled
    text_embeddings: torch.Tensor  # (N, L, D)
    noise: torch.Tensor  # like latents
    timesteps: torch.Tensor  # (N,)
    weights: torch.Tensor | None = None  # (N,) per-sample loss weights (DreamBooth's class images); None: all 1

    def to(self, device: torch.device, channels_last: bool = False) -> "StepBatch":
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return StepBatch(self.latents.to(device, memory_format=fmt), self.text_embeddings.to(device),
                         self.noise.to(device, memory_format=fmt), self.timesteps.to(device),
                         None if self.weights is None else self.weights.to(device))

    def split(self, parts: int) -> list["StepBatch"]:
        fields = (self.latents, self.text_embeddings, self.noise, self.timesteps)
        if self.weights is not None:
            fields += (self.weights,)
        return [StepBatch(*chunk) for chunk in zip(*(f.chunk(parts) for f in fields))]


def draw_noise(latents: torch.Tensor, num_train_timesteps: int, cfg: TrainConfig, seed: int, step: int,
               rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, timesteps) of one step: pure in (seed, step, rank) and the config."""
    noise = torch.randn(latents.shape, generator=step_generator(seed, step, rank, "noise"))
    if cfg.noise_offset > 0:
        noise = objectives.offset_noise(noise, cfg.noise_offset, step_generator(seed, step, rank, "offset"))
    timesteps = objectives.sample_timesteps(len(latents), num_train_timesteps,
                                            step_generator(seed, step, rank, "timesteps"), cfg.timestep_sampling,
                                            logit_mean=cfg.logit_mean, logit_std=cfg.logit_std)
    return noise, timesteps


def accumulate_gradients(unet: torch.nn.Module, scheduler, batch: StepBatch, cfg: TrainConfig,
                         precision: Precision) -> float:
    """Backward over `gradient_accumulation_steps` micro-batches; returns the step's mean loss.

    Under DDP only the last micro-batch all-reduces gradients (`no_sync` before it).
    """
    parts = batch.split(cfg.gradient_accumulation_steps)
    total = 0.0
    for index, micro in enumerate(parts):
        last = index == len(parts) - 1
        sync = contextlib.nullcontext() if last or not hasattr(unet, "no_sync") else unet.no_sync()
        with sync:
            with precision.autocast():
                loss = objectives.diffusion_loss(
                    unet, scheduler, micro.latents, micro.text_embeddings, micro.noise, micro.timesteps,
                    cfg.prediction_type, weighting=cfg.loss_weighting, snr_gamma=cfg.snr_gamma,
                    sample_weights=micro.weights)
            # Each micro-batch's mean is weighted by its share of the step's samples.
            share = len(micro.latents) / len(batch.latents)
            precision.backward(loss * share)
        total += loss.item() * share
    return total


def grad_norm_and_clip(parameters, max_norm: float | None) -> float:
    """The total gradient norm before clipping (inf/nan when a gradient is not finite)."""
    return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm or float("inf")))
