"""Stage 1: train a small AutoencoderKL on the images (reconstruction + a little KL).

After training, `scaling_factor` is set to 1/std of the training latents, as
Stable Diffusion does (0.18215 for SD 1.x), so the UNet sees unit-variance latents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from stablediff.config.schema import VAEConfig
from stablediff.training.lr_schedule import lr_multiplier
from stablediff.training.progress import StepProgress
from stablediff.training.seeding import step_generator


@dataclass
class VAEReport:
    steps: int
    train_loss: float
    held_out_mse: float
    held_out_psnr: float
    scaling_factor: float


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, var) || N(0, 1)), averaged over elements."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


@dataclass
class VAETrainState:
    """What a resumed stage 1 needs besides the config: each step's batch and noise come from (seed, step)."""

    vae: AutoencoderKL
    optimizer: torch.optim.Optimizer
    step: int = 0  # steps done
    last_loss: float = float("nan")


def make_vae_state(vae: AutoencoderKL, cfg: VAEConfig) -> VAETrainState:
    return VAETrainState(vae, torch.optim.AdamW(vae.parameters(), lr=cfg.learning_rate, weight_decay=0.0))


def train_vae(vae: AutoencoderKL, images: torch.Tensor, held_out: torch.Tensor, cfg: VAEConfig,
              seed: int, log=None, state: VAETrainState | None = None,
              after_step: Callable[[VAETrainState], None] | None = None) -> VAEReport:
    """Train in place; images and held_out are (N, 3, H, W) in [-1, 1].

    `state`: continue a restored stage 1 (its `vae` is this `vae`); `after_step(state)` runs at
    each step boundary (checkpoints, the stop flag).
    """
    state = state or make_vae_state(vae, cfg)
    vae.train()
    with StepProgress("vae", cfg.train_steps, start=state.step) as progress:
        while state.step < cfg.train_steps:
            vae_step(state, images, cfg, seed)
            progress.update(state.step, state.last_loss, cfg.batch_size)
            if log and (state.step % 50 == 0 or state.step == cfg.train_steps):
                log(stage="vae", step=state.step, loss=state.last_loss)
            if after_step is not None:
                after_step(state)
    vae.eval()
    mse = reconstruction_mse(vae, held_out)
    std = latent_std(vae, images)
    vae.register_to_config(scaling_factor=float(1.0 / std))
    psnr = float(10 * np.log10(4.0 / mse)) if mse > 0 else float("inf")  # peak-to-peak range is 2
    return VAEReport(state.step, state.last_loss, mse, psnr, float(1.0 / std))


def vae_step(state: VAETrainState, images: torch.Tensor, cfg: VAEConfig, seed: int) -> None:
    """One optimizer step: reconstruction + a little KL on a batch drawn by (seed, step)."""
    vae, step = state.vae, state.step
    g = step_generator(seed, step, 0, "vae")
    idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
    batch = images[idx]
    posterior = vae.encode(batch).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
    recon = vae.decode(z).sample
    loss = F.mse_loss(recon, batch) + cfg.kl_weight * kl_divergence(posterior.mean, posterior.logvar)
    for group in state.optimizer.param_groups:
        group["lr"] = cfg.learning_rate * lr_multiplier(step, min(50, cfg.train_steps // 10), cfg.train_steps, "cosine")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.step, state.last_loss = step + 1, loss.item()


@torch.no_grad()
def reconstruction_mse(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> float:
    errors = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        recon = vae.decode(vae.encode(batch).latent_dist.mean).sample
        errors.append(F.mse_loss(recon, batch, reduction="sum"))
    return float(sum(errors) / images.numel())


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> float:
    means = [vae.encode(images[s : s + batch_size]).latent_dist.mean for s in range(0, len(images), batch_size)]
    return float(torch.cat(means).std())
