"""Build, load and run diffusers' StableDiffusionPipeline around our components.

Seeds follow the A1111 convention: image i of a call with seed S is drawn
from a CPU generator seeded with S + i, so any single image can be re-created
alone, on any device.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image

from stablediff.models.weights_guard import check_model_folder


def default_scheduler(training_scheduler_config: dict) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M), the fast sampler most users expect by default."""
    return DPMSolverMultistepScheduler.from_config(training_scheduler_config, algorithm_type="dpmsolver++")


def assemble_pipeline(vae, text_encoder, tokenizer, unet, training_scheduler_config: dict) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=default_scheduler(training_scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline_folder(path: str | Path, trust_pickle: bool = False) -> StableDiffusionPipeline:
    folder = Path(path).expanduser()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json). Give the folder that "
            "`stablediff demo` or `stablediff ckpt export --format diffusers` wrote, e.g. RUN_DIR/export/diffusers."
        )
    check_model_folder(folder, trust_pickle)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators_for(seed: int, count: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]


@torch.no_grad()
def txt2img(pipe: StableDiffusionPipeline, prompt: str, *, negative_prompt: str | None = None,
            steps: int = 20, guidance_scale: float = 3.0, seed: int = 0, num: int = 1,
            size: tuple[int, int] | None = None) -> list[Image.Image]:
    width, height = size or (None, None)
    result = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                  guidance_scale=guidance_scale, num_images_per_prompt=num, height=height, width=width,
                  generator=generators_for(seed, num), output_type="pil")
    return list(result.images)


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
