"""Stage 2: train the text-conditioned UNet on encoded latents and caption embeddings.

The loop reads top to bottom: draw a batch, compute the loss (a pure function
in `objectives`), step the optimizer, update the EMA, log, and let the
checkpoint hook look at the step. Everything a resumed run needs lives in
`UNetTrainState`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from stablediff.config.schema import DataConfig, TrainConfig
from stablediff.data.sampler import ResumableSampler
from stablediff.training.ema import EMA
from stablediff.training.features import EncodedDataset
from stablediff.training.lr_schedule import lr_multiplier
from stablediff.training.metrics import MetricsLog
from stablediff.training.objectives import diffusion_loss
from stablediff.training.progress import StepProgress
from stablediff.training.seeding import step_generator


@dataclass
class UNetTrainState:
    unet: UNet2DConditionModel
    ema: EMA
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: ResumableSampler
    step: int = 0
    images_seen: int = 0
    last_loss: float = float("nan")
    extra: dict = field(default_factory=dict)


def make_train_state(unet: UNet2DConditionModel, cfg: TrainConfig, num_samples: int, seed: int,
                     world_size: int = 1, rank: int = 0) -> UNetTrainState:
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule))
    sampler = ResumableSampler(num_samples, seed=seed, world_size=world_size, rank=rank)
    return UNetTrainState(unet, EMA(unet, cfg.ema_decay), optimizer, lr_scheduler, sampler)


def draw_batch(data: EncodedDataset, indices: torch.Tensor, scaling_factor: float, caption_dropout: float,
               seed: int, step: int, rank: int, flip_probability: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (B, C, h, w), scaled, and text embeddings (B, L, D) for one step; pure in its inputs."""
    g_post = step_generator(seed, step, rank, "posterior")
    mean, std = data.latent_mean[indices], data.latent_std[indices]
    if flip_probability > 0:  # mirrored images' posteriors were cached alongside
        flipped = (torch.rand(len(indices), generator=step_generator(seed, step, rank, "flip"))
                   < flip_probability).view(-1, 1, 1, 1)
        mean = torch.where(flipped, data.flip_mean[indices], mean)
        std = torch.where(flipped, data.flip_std[indices], std)
    latents = (mean + std * torch.randn(mean.shape, generator=g_post)) * scaling_factor
    g_drop = step_generator(seed, step, rank, "dropout")
    choice = torch.rand(len(indices), generator=g_drop)
    dropped = torch.rand(len(indices), generator=g_drop) < caption_dropout
    rows = []
    for i, sample in enumerate(indices.tolist()):
        options = data.caption_ids[sample]
        rows.append(0 if dropped[i] else options[int(choice[i] * len(options))])
    return latents, data.embeddings[torch.tensor(rows)]


def train_unet(state: UNetTrainState, data: EncodedDataset, noise_scheduler: DDPMScheduler, cfg: TrainConfig,
               scaling_factor: float, data_cfg: DataConfig, seed: int, metrics: MetricsLog,
               on_step_end: Callable[[UNetTrainState], None] | None = None, rank: int = 0) -> UNetTrainState:
    state.unet.train()
    num_timesteps = noise_scheduler.config.num_train_timesteps
    with StepProgress("unet", cfg.max_steps, start=state.step, log_every=cfg.log_every) as progress:
        while state.step < cfg.max_steps:
            t0 = time.perf_counter()
            indices = torch.from_numpy(state.sampler.next_batch(cfg.batch_size))
            latents, text_embeddings = draw_batch(data, indices, scaling_factor, data_cfg.caption_dropout, seed,
                                                  state.step, rank, data_cfg.flip_probability)
            noise = torch.randn(latents.shape, generator=step_generator(seed, state.step, rank, "noise"))
            timesteps = torch.randint(0, num_timesteps, (len(indices),),
                                      generator=step_generator(seed, state.step, rank, "timesteps"))
            loss = diffusion_loss(state.unet, noise_scheduler, latents, text_embeddings, noise, timesteps,
                                  cfg.prediction_type)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(state.unet.parameters(), cfg.grad_clip or float("inf"))
            state.optimizer.step()
            state.lr_scheduler.step()
            state.ema.update(state.unet, state.step)
            state.step += 1
            state.images_seen += len(indices)
            state.last_loss = loss.item()
            progress.update(state.step, state.last_loss, len(indices))
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                metrics.write(stage="unet", step=state.step, loss=state.last_loss, grad_norm=float(grad_norm),
                              lr=state.optimizer.param_groups[0]["lr"], images_per_second=round(
                                  len(indices) / (time.perf_counter() - t0), 1))
            if on_step_end is not None:
                on_step_end(state)
    state.unet.eval()
    return state
