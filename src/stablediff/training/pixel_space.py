"""Pixel-space models (`vae.enabled: false`): the UNet denoises the images themselves.

The training loop is unchanged: the "latents" are the images in [-1, 1] with a
zero posterior spread, and the scaling factor is 1. diffusers has no
StableDiffusionPipeline without a VAE, so sampling is a short classifier-free
guided loop over a diffusers scheduler here.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from stablediff.models.text_encoder import TextEncoder
from stablediff.training.encoded_dataset import EncodedDataset, caption_table


@torch.no_grad()
def encode_pixels(images: torch.Tensor, captions: list[list[str]], text_encoder: TextEncoder,
                  flip: bool = False) -> EncodedDataset:
    """images (N, 3, H, W) in [-1, 1] as a dataset the loop reads like cached latents."""
    distinct, caption_ids = caption_table(captions)
    zeros = torch.zeros_like(images)
    mirrored = images.flip(-1) if flip else None
    return EncodedDataset.single(images, zeros, text_encoder.encode(distinct), caption_ids, mirrored,
                                 zeros if flip else None)


@torch.no_grad()
def sample_pixels(unet: torch.nn.Module, scheduler_config: dict, text_encoder: TextEncoder, prompt: str, *,
                  num: int, seed: int, steps: int, guidance_scale: float, size: int) -> list[Image.Image]:
    """Images for `prompt` with DPM-Solver++; image i starts from a CPU generator seeded seed + i."""
    scheduler = DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++")
    scheduler.set_timesteps(steps)
    device = next(unet.parameters()).device
    cond = text_encoder.encode([prompt] * num).to(device)
    uncond = text_encoder.encode([""] * num).to(device)
    x = torch.stack([torch.randn((unet.config.in_channels, size, size),
                                 generator=torch.Generator().manual_seed(seed + i)) for i in range(num)])
    x = x.to(device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        pred_uncond, pred_cond = unet(model_in, t, torch.cat([uncond, cond])).sample.chunk(2)
        x = scheduler.step(pred_uncond + guidance_scale * (pred_cond - pred_uncond), t, x).prev_sample
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]
