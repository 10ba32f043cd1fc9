"""Sampler/steps sweep: one metric against the number of sampling steps, for each sampler.

Every cell generates the same prompts from the same seeds (prompt p's images use seeds
`seed`, `seed + 1`, ...), so the cells differ only by sampler and steps and the table
shows what fewer steps cost. The metric is a callable of (images, prompts) with
prompts[i] the prompt of images[i]; it must not be at its ceiling for the table to say
anything (on the digits, adherence of a demo-length model is; see bench/RESULTS.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

SWEEP_SAMPLERS = ("dpmpp_2m", "euler_a", "ddim", "unipc")
SWEEP_STEPS = (4, 8, 12, 16, 20)

Metric = Callable[[list[Image.Image], list[str]], float]


@dataclass(frozen=True)
class SweepCell:
    sampler: str
    steps: int
    value: float
    count: int  # images the metric judged
    seconds: float  # generation and metric together, wall clock

    def to_json(self) -> dict:
        return asdict(self)


def sampler_sweep(pipe, prompts: Sequence[str], metric: Metric, *, samplers: Sequence[str] = SWEEP_SAMPLERS,
                  steps: Sequence[int] = SWEEP_STEPS, per_prompt: int = 1, seed: int = 1000,
                  guidance_scale: float = 3.0, stop: Callable[[], None] | None = None) -> list[SweepCell]:
    """`metric` of `per_prompt` images per prompt for every (sampler, steps), samplers outer; `pipe` is a
    diffusers StableDiffusionPipeline whose scheduler is restored afterwards."""
    from stablediff.inference.schedulers import get_sampler, make_scheduler

    for name in samplers:
        get_sampler(name)  # an unknown name fails before any image is made
    original, config = pipe.scheduler, dict(pipe.scheduler.config)
    cells = []
    try:
        for name in samplers:
            for num_steps in steps:
                if stop is not None:
                    stop()
                pipe.scheduler = make_scheduler(name, config, num_steps)
                cells.append(_cell(pipe, name, num_steps, prompts, metric, per_prompt, seed, guidance_scale))
    finally:
        pipe.scheduler = original
    return cells


def _cell(pipe, sampler: str, num_steps: int, prompts: Sequence[str], metric: Metric, per_prompt: int, seed: int,
          guidance_scale: float) -> SweepCell:
    from stablediff.inference.pipeline import txt2img

    started = time.perf_counter()
    images, image_prompts = [], []
    for prompt in prompts:
        batch = txt2img(pipe, prompt, steps=num_steps, guidance_scale=guidance_scale, seed=seed, num=per_prompt)
        images += batch
        image_prompts += [prompt] * len(batch)
    value = float(metric(images, image_prompts))
    return SweepCell(sampler, num_steps, value, len(images), time.perf_counter() - started)


def sweep_table(cells: Sequence[SweepCell], digits: int = 3) -> str:
    """A Markdown table: one row per step count, one column per sampler."""
    samplers = list(dict.fromkeys(c.sampler for c in cells))
    steps = sorted({c.steps for c in cells})
    value = {(c.sampler, c.steps): c.value for c in cells}
    lines = ["| steps | " + " | ".join(samplers) + " |", "|---:|" + "---:|" * len(samplers)]
    for n in steps:
        row = [f"{value[s, n]:.{digits}f}" if (s, n) in value else "" for s in samplers]
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def digit_adherence_metric(prompts: dict[int, str], resolution: int = 32) -> Metric:
    """A sweep metric for the digits: adherence (accuracy) of images made from `prompts` {digit: prompt}."""
    from stablediff.evaluation.adherence import adherence
    from stablediff.inference.pipeline import images_to_array

    digit_of = {prompt: digit for digit, prompt in prompts.items()}

    def metric(images: list[Image.Image], image_prompts: list[str]) -> float:
        requested = np.array([digit_of[p] for p in image_prompts])
        return adherence(images_to_array(images), requested, resolution).adherence

    return metric
