"""Diffusion training objectives as pure functions: loss weights, offset noise, timestep
sampling, and the loss of one step. The forward-process math they build on (noise
schedules, targets, the per-sample loss) is in models/diffusion.py.

Every random draw takes an explicit `torch.Generator`, so a step stays a pure
function of (seed, step, rank) (see `seeding.step_generator`); nothing here
touches the global RNG.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from stablediff.errors import ConfigError
from stablediff.models.diffusion import check_prediction_type, per_sample_loss, snr
LOSS_WEIGHTINGS = ("uniform", "min_snr")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def loss_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, prediction_type: str,
                 weighting: str = "uniform", snr_gamma: float = 5.0) -> torch.Tensor:
    """Per-sample loss weights (B,).

    min_snr: Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy") caps the x0-space weight at gamma so easy, low-noise steps stop
    dominating; expressed for each target: x0 min(snr, g), epsilon min(snr, g) / snr,
    v min(snr, g) / (snr + 1).
    """
    check_prediction_type(prediction_type)
    if weighting == "uniform":
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    if weighting != "min_snr":
        raise ConfigError(f"train.loss_weighting {weighting!r} is not supported; use one of {LOSS_WEIGHTINGS}")
    if snr_gamma <= 0:
        raise ConfigError(f"train.snr_gamma must be positive (5.0 is the paper's choice), got {snr_gamma}")
    ratio = snr(scheduler, timesteps)
    clipped = ratio.clamp(max=snr_gamma)
    if prediction_type == "sample":
        return clipped
    if prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    # epsilon: min(snr, g) / snr -> 1 as snr -> 0 (only reachable with zero terminal SNR)
    return torch.where(ratio > 0, clipped / ratio.clamp(min=torch.finfo(ratio.dtype).tiny), torch.ones_like(ratio))


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator) -> torch.Tensor:
    """noise + offset * N(0, 1) per sample and channel, constant over the image
    (Guttenberg 2023, crosslabs "Diffusion with Offset Noise"): lets the model learn to
    change an image's mean brightness, i.e. produce very dark or bright images. 0 disables."""
    if offset < 0:
        raise ConfigError(f"train.noise_offset must be >= 0 (0.05-0.1 is typical), got {offset}")
    if offset == 0:
        return noise
    batch, channels = noise.shape[:2]
    shift = torch.randn((batch, channels) + (1,) * (noise.dim() - 2), generator=generator,
                        device=generator.device, dtype=torch.float32)
    return noise + offset * shift.to(device=noise.device, dtype=noise.dtype)


def sample_timesteps(batch_size: int, num_train_timesteps: int, generator: torch.Generator,
                     method: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """Discrete training timesteps (B,) int64 in [0, num_train_timesteps).

    uniform: every timestep equally often (DDPM).
    logit_normal: t = sigmoid(N(mean, std)) * T (Esser et al. 2024, "Scaling Rectified Flow
    Transformers", SD3), concentrating training on the middle noise levels.
    """
    if method == "uniform":
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=generator.device)
    if method != "logit_normal":
        raise ConfigError(f"train.timestep_sampling {method!r} is not supported; use one of {TIMESTEP_SAMPLINGS}")
    if logit_std <= 0:
        raise ConfigError(f"train.logit_std must be positive (1.0 is SD3's choice), got {logit_std}")
    normal = torch.randn((batch_size,), generator=generator, device=generator.device, dtype=torch.float64)
    u = torch.sigmoid(logit_mean + logit_std * normal)
    return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def diffusion_loss(unet: torch.nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor,
                   text_embeddings: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   prediction_type: str, weighting: str = "uniform", snr_gamma: float = 5.0,
                   sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar training loss: the mean over the batch of weighted per-sample MSE.

    With weighting="uniform" this is plain MSE between the prediction and its target.
    `sample_weights` (B,) multiply each sample's loss before the mean (DreamBooth's prior_loss_weight on
    the class images); None is all ones and computes exactly what it did without them.
    """
    weights = loss_weights(scheduler, timesteps, prediction_type, weighting, snr_gamma)
    if sample_weights is not None:
        weights = weights * sample_weights.to(weights.device, weights.dtype)
    losses = per_sample_loss(unet, scheduler, latents, text_embeddings, noise, timesteps, prediction_type)
    return (losses * weights.to(losses.device)).mean()
