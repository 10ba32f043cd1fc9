"""Run diffusers' Stable Diffusion pipelines (built and loaded by models/pipeline_assembly.py).

Seeds follow the A1111 convention: image i of a call with seed S is drawn
from a CPU generator seeded with S + i, so any single image can be re-created
alone, on any device.

img2img and inpainting are diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline built from the text-to-image pipeline's own
modules (no copy of any weight). A normal 4-channel UNet inpaints the legacy
way diffusers does for `unet.in_channels == 4`: after every step the latents
outside the mask are replaced by the input's latents noised to that step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from PIL import Image

from stablediff.errors import GenerationError
from stablediff.models.build import downscale_factor


def model_default_size(pipe) -> tuple[int, int]:
    side = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    return side, side


def size_multiple(pipe) -> int:
    """Width and height must divide into the VAE's and the UNet's downsampling (and diffusers' 8)."""
    unet_factor = downscale_factor(pipe.unet.config.block_out_channels)
    return math.lcm(pipe.vae_scale_factor * unet_factor, 8)


def check_size(pipe, size: tuple[int, int]) -> None:
    multiple = size_multiple(pipe)
    width, height = size
    if width < multiple or height < multiple or width % multiple or height % multiple:
        fit = (max(multiple, round(width / multiple) * multiple), max(multiple, round(height / multiple) * multiple))
        raise GenerationError(f"size {width}x{height} does not fit this model: width and height must be multiples of "
                              f"{multiple}; use e.g. --size {fit[0]}x{fit[1]}")


def generators_for(seed: int, count: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]


def seeded_generators(pipe, seed: int, count: int) -> list[torch.Generator]:
    """All of a call's randomness from its images' seeds: the generators of the initial noise, and for
    SDE samplers one Brownian tree per image (diffusers' default is one per batch, from the global RNG)."""
    if hasattr(pipe.scheduler, "noise_sampler_seed"):
        pipe.scheduler.noise_sampler_seed = [seed + i for i in range(count)]
    return generators_for(seed, count)


@torch.no_grad()
def txt2img(pipe: StableDiffusionPipeline, prompt: str, *, negative_prompt: str | None = None,
            steps: int = 20, guidance_scale: float = 3.0, seed: int = 0, num: int = 1,
            size: tuple[int, int] | None = None) -> list[Image.Image]:
    width, height = size or (None, None)
    result = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                  guidance_scale=guidance_scale, num_images_per_prompt=num, height=height, width=width,
                  generator=seeded_generators(pipe, seed, num), output_type="pil")
    return list(result.images)


@torch.no_grad()
def txt2img_many(pipe: StableDiffusionPipeline, prompts: list[str], *, steps: int = 20, guidance_scale: float = 3.0,
                 seed: int = 0, num: int = 1) -> list[Image.Image]:
    """`num` images of each prompt (prompt-major) in one batch: image i of every prompt starts from seed + i, as
    with `txt2img` per prompt, but each step is one model call for all of them. On a CPU, where a small model's
    cost per call barely depends on the batch, that is several times faster; the pixels can differ from the
    per-prompt calls by float rounding (batched kernels sum in another order)."""
    seeds = [seed + i for _ in prompts for i in range(num)]
    if hasattr(pipe.scheduler, "noise_sampler_seed"):
        pipe.scheduler.noise_sampler_seed = seeds
    result = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                  num_images_per_prompt=num, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                  output_type="pil")
    return list(result.images)


@torch.no_grad()
def img2img(pipe: StableDiffusionPipeline, prompt: str, init_image: Image.Image, *, strength: float,
            negative_prompt: str | None = None, steps: int = 20, guidance_scale: float = 3.0, seed: int = 0,
            num: int = 1) -> list[Image.Image]:
    """Images like `init_image` (already at the output size); strength 0..1 is how much is redrawn."""
    check_strength(strength, steps)
    derived = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    derived.set_progress_bar_config(disable=True)
    result = derived(prompt, image=init_image, strength=strength, negative_prompt=negative_prompt,
                     num_inference_steps=steps, guidance_scale=guidance_scale, num_images_per_prompt=num,
                     generator=seeded_generators(pipe, seed, num), output_type="pil")
    return list(result.images)


@torch.no_grad()
def inpaint(pipe: StableDiffusionPipeline, prompt: str, init_image: Image.Image, mask: Image.Image, *,
            strength: float, negative_prompt: str | None = None, steps: int = 20, guidance_scale: float = 3.0,
            seed: int = 0, num: int = 1) -> list[Image.Image]:
    """Redraw where `mask` is white (>= 128), keep where it is black.

    The kept pixels are pasted back from `init_image` afterwards, as A1111 does: the
    VAE cannot reproduce them exactly, and a user asked for them unchanged.
    """
    check_strength(strength, steps)
    derived = StableDiffusionInpaintPipeline(**pipe.components, requires_safety_checker=False)
    derived.set_progress_bar_config(disable=True)
    binary = mask.convert("L").point(lambda v: 255 if v >= 128 else 0)
    result = derived(prompt, image=init_image, mask_image=binary, strength=strength,
                     negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                     num_images_per_prompt=num, height=init_image.height, width=init_image.width,
                     generator=seeded_generators(pipe, seed, num), output_type="pil")
    rgb = init_image.convert("RGB")
    return [Image.composite(image, rgb, binary) for image in result.images]


def check_strength(strength: float, steps: int) -> None:
    # diffusers runs int(steps * strength) steps; zero steps would return the input unchanged or fail.
    if not 0 < strength <= 1:
        raise GenerationError(f"strength {strength} is outside (0, 1]: 0.3 keeps most of the input image, 1 redraws it all")
    if int(steps * strength) < 1:
        raise GenerationError(f"strength {strength} with {steps} steps runs no denoising step (diffusers runs "
                              f"int(steps x strength) of them); raise --steps to at least {math.ceil(1 / strength)} "
                              "or raise --strength")


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Tile images: one list per row, all the same size."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * w, y * h))
    return grid


def images_to_array(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images])
