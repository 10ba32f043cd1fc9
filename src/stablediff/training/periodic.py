"""What happens every N steps besides saving: the validation loss and the sample grid.

Both run on rank 0 under `torch.random.fork_rng`, with their own seeded
generators, so they never change what the training steps draw: a run with
validation every step trains exactly like one without.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stablediff.config import RunConfig
from stablediff.evaluation.settings import VALIDATION_SAMPLES
from stablediff.evaluation.val_loss import validation_loss


@dataclass
class ValidationSet:
    latents: torch.Tensor  # (M, C, h, w): scaled posterior means of held-out images
    text_embeddings: torch.Tensor  # (M, L, D): their captions ("" where a source gives none)
    prompts: list[str] | None = None  # those captions (re-encoded before each validation by textual inversion)


@torch.no_grad()
def make_validation_set(vae, held_out: torch.Tensor, text_encoder, scaling_factor: float,
                        captions: list[str] | None = None) -> ValidationSet:
    images = held_out[:VALIDATION_SAMPLES]
    latents = images if vae is None else vae.encode(images).latent_dist.mean * scaling_factor
    prompts = list(captions[: len(images)]) if captions else []
    prompts += [""] * (len(images) - len(prompts))
    return ValidationSet(latents, text_encoder.encode(prompts), prompts)


def run_validation(unet: torch.nn.Module, noise_scheduler, vset: ValidationSet, prediction_type: str,
                   num_timesteps: int) -> dict:
    """{"loss", "per_timestep"} over evenly spaced fixed timesteps with fixed noise, on the model's device."""
    device = next(unet.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return validation_loss(unet, noise_scheduler, vset.latents.to(device), vset.text_embeddings.to(device),
                               prediction_type, timesteps=num_timesteps)


def write_samples(stage, config, path: Path) -> Path:
    """The sample grid of the configured prompts and seeds, from the EMA weights."""
    from stablediff.inference.pipeline import image_grid

    with torch.random.fork_rng(devices=[]):
        if stage.vae is None:
            from stablediff.training.pixel_space import sample_pixels

            rows = [sample_pixels(stage.state.ema.model, dict(stage.noise_scheduler.config), stage.text_encoder,
                                  prompt, num=config.sample.per_prompt, seed=config.sample.seed,
                                  steps=config.sample.steps, guidance_scale=config.sample.guidance_scale,
                                  size=config.data.resolution) for prompt in config.sample.prompts]
        else:
            write_sample_grid(stage.pipeline(), config, path)
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows).save(path)
    return path


def write_sample_grid(pipe, config: RunConfig, path: Path) -> list:
    """One row per configured prompt, `per_prompt` seeds each; returns the rows."""
    from stablediff.inference.pipeline import image_grid, txt2img

    rows = [txt2img(pipe, prompt, steps=config.sample.steps, guidance_scale=config.sample.guidance_scale,
                    seed=config.sample.seed, num=config.sample.per_prompt) for prompt in config.sample.prompts]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows).save(path)
    return rows
