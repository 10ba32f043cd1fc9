"""Stage 1: train a small AutoencoderKL on the images (reconstruction + a little KL).

After training, `scaling_factor` is set to 1/std of the training latents, as
Stable Diffusion does (0.18215 for SD 1.x), so the UNet sees unit-variance latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from stablediff.config.schema import VAEConfig
from stablediff.training.lr_schedule import lr_multiplier
from stablediff.training.progress import StepProgress
from stablediff.training.seeding import step_generator


def tensor_to_images(tensor: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((tensor.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


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


def train_vae(vae: AutoencoderKL, images: torch.Tensor, held_out: torch.Tensor, cfg: VAEConfig,
              seed: int, log=None) -> VAEReport:
    """Train in place; images and held_out are (N, 3, H, W) in [-1, 1]."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    vae.train()
    loss_value = float("nan")
    with StepProgress("vae", cfg.train_steps) as progress:
        for step in range(cfg.train_steps):
            g = step_generator(seed, step, 0, "vae")
            idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
            batch = images[idx]
            posterior = vae.encode(batch).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
            recon = vae.decode(z).sample
            loss = F.mse_loss(recon, batch) + cfg.kl_weight * kl_divergence(posterior.mean, posterior.logvar)
            for group in optimizer.param_groups:
                group["lr"] = cfg.learning_rate * lr_multiplier(step, min(50, cfg.train_steps // 10), cfg.train_steps, "cosine")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = loss.item()
            progress.update(step + 1, loss_value, len(batch))
            if log and ((step + 1) % 50 == 0 or step + 1 == cfg.train_steps):
                log(stage="vae", step=step + 1, loss=loss_value)
    vae.eval()
    mse = reconstruction_mse(vae, held_out)
    std = latent_std(vae, images)
    vae.register_to_config(scaling_factor=float(1.0 / std))
    psnr = float(10 * np.log10(4.0 / mse)) if mse > 0 else float("inf")  # peak-to-peak range is 2
    return VAEReport(cfg.train_steps, loss_value, mse, psnr, float(1.0 / std))


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
