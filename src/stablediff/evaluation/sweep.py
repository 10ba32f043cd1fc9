"""Sampler/steps sweep: one metric against the number of sampling steps, for each sampler.

Every cell generates the same prompts from the same seeds (prompt p's images use seeds
`seed`, `seed + 1`, ...), so the cells differ only by sampler and steps and the table
shows what fewer steps cost. The metric is a callable of (images, prompts) with
prompts[i] the prompt of images[i], returning a number or a mapping of named numbers
(FD, KID, accuracy... of the same images); it must not be at its ceiling for the table
to say anything (on the digits, adherence of a demo-length model is; see bench/RESULTS.md).

One sweep shows one seed block. `repeated_sweep` runs several, each with its own seeds,
so the spread between repeats is the seed-to-seed spread a difference must beat; it
interleaves the cells (steps outer, the sampler order rotated each repeat) so that a
machine getting slower or faster during the sweep does not favour one sampler.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from stablediff.evaluation.frechet import SampleCountWarning

SWEEP_SAMPLERS = ("dpmpp_2m", "euler_a", "ddim", "unipc")
SWEEP_STEPS = (4, 8, 12, 16, 20)

Metric = Callable[[list[Image.Image], list[str]], float | Mapping[str, float]]


@dataclass(frozen=True)
class SweepCell:
    sampler: str
    steps: int
    value: float  # the metric's number; for a metric of several numbers, the first of them
    count: int  # images the metric judged
    seconds: float  # generation and metric together, wall clock
    values: dict[str, float] = field(default_factory=dict)  # every named number of a mapping metric
    generation_seconds: float = 0.0  # the images alone: seconds per image is this / count
    seed: int = 1000  # the first seed of the cell's seed block
    repeat: int = 0  # which seed block of a repeated sweep

    def to_json(self) -> dict:
        return asdict(self)


def sampler_sweep(pipe, prompts: Sequence[str], metric: Metric, *, samplers: Sequence[str] = SWEEP_SAMPLERS,
                  steps: Sequence[int] = SWEEP_STEPS, per_prompt: int = 1, seed: int = 1000,
                  guidance_scale: float = 3.0, stop: Callable[[], None] | None = None,
                  order: Sequence[tuple[str, int]] | None = None, repeat: int = 0,
                  batched: bool = False) -> list[SweepCell]:
    """`metric` of `per_prompt` images per prompt for every (sampler, steps), samplers outer (or the cells of
    `order`, in that order); `pipe` is a diffusers StableDiffusionPipeline whose scheduler is restored
    afterwards. `batched` makes each cell's images in one batch (inference.pipeline.txt2img_many: the same
    seeds, several times faster on a CPU, pixels equal to the per-prompt calls' up to float rounding)."""
    from stablediff.inference.schedulers import get_sampler, make_scheduler

    cells_to_run = list(order) if order is not None else [(s, n) for s in samplers for n in steps]
    for name in dict.fromkeys(s for s, _ in cells_to_run):
        get_sampler(name)  # an unknown name fails before any image is made
    original, config = pipe.scheduler, dict(pipe.scheduler.config)
    cells = []
    try:
        for name, num_steps in cells_to_run:
            if stop is not None:
                stop()
            pipe.scheduler = make_scheduler(name, config, num_steps)
            cells.append(_cell(pipe, name, num_steps, prompts, metric, per_prompt, seed, guidance_scale, repeat,
                               batched))
    finally:
        pipe.scheduler = original
    return cells


def interleaved_order(samplers: Sequence[str], steps: Sequence[int], repeat: int) -> list[tuple[str, int]]:
    """The cells of one repeat: steps outer, samplers inner, the sampler order rotated by `repeat`."""
    shift = repeat % len(samplers) if samplers else 0
    rotated = list(samplers[shift:]) + list(samplers[:shift])
    return [(s, n) for n in steps for s in rotated]


def repeated_sweep(pipe, prompts: Sequence[str], metric: Metric, *, repeats: int, seed: int = 1000,
                   seed_stride: int | None = None, samplers: Sequence[str] = SWEEP_SAMPLERS,
                   steps: Sequence[int] = SWEEP_STEPS, per_prompt: int = 1, guidance_scale: float = 3.0,
                   stop: Callable[[], None] | None = None, batched: bool = False) -> list[SweepCell]:
    """`repeats` sweeps, repeat r with seeds from `seed + r * seed_stride` (default stride: per_prompt, so no
    two repeats share a seed) and the cells interleaved by `interleaved_order`. Within a repeat every cell
    has the same seeds."""
    stride = per_prompt if seed_stride is None else seed_stride
    if repeats < 1 or stride < per_prompt:
        raise ValueError(f"repeats must be >= 1 and seed_stride >= per_prompt ({per_prompt}) so seed blocks do "
                         f"not overlap; got repeats={repeats}, seed_stride={stride}")
    cells: list[SweepCell] = []
    for r in range(repeats):
        cells += sampler_sweep(pipe, prompts, metric, per_prompt=per_prompt, seed=seed + r * stride,
                               guidance_scale=guidance_scale, stop=stop,
                               order=interleaved_order(samplers, steps, r), repeat=r, batched=batched)
    return cells


def _cell(pipe, sampler: str, num_steps: int, prompts: Sequence[str], metric: Metric, per_prompt: int, seed: int,
          guidance_scale: float, repeat: int = 0, batched: bool = False) -> SweepCell:
    from stablediff.inference.pipeline import txt2img, txt2img_many

    started = time.perf_counter()
    if batched:
        images = txt2img_many(pipe, list(prompts), steps=num_steps, guidance_scale=guidance_scale, seed=seed,
                              num=per_prompt)
        image_prompts = [prompt for prompt in prompts for _ in range(per_prompt)]
    else:
        images, image_prompts = [], []
        for prompt in prompts:
            batch = txt2img(pipe, prompt, steps=num_steps, guidance_scale=guidance_scale, seed=seed, num=per_prompt)
            images += batch
            image_prompts += [prompt] * len(batch)
    generated = time.perf_counter() - started
    result = metric(images, image_prompts)
    values = {str(k): float(v) for k, v in result.items()} if isinstance(result, Mapping) else {}
    value = next(iter(values.values())) if values else float(result)
    return SweepCell(sampler, num_steps, value, len(images), time.perf_counter() - started, values, generated,
                     seed, repeat)


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


def digit_distribution_metric(prompts: dict[int, str], reference_features: np.ndarray, resolution: int = 32,
                              kid_subsets: int = 100) -> Metric:
    """A sweep metric for the digits that is not at its ceiling: {"fd", "kid", "kid_std", "adherence",
    "macro_f1"} of images made from `prompts` {digit: prompt}. FD and KID are against `reference_features`
    (digit_features.real_features("held_out"), computed once by the caller) in the built-in digits feature
    space; adherence and macro F1 are the digit classifier's (evaluation/adherence)."""
    from stablediff.evaluation.adherence import adherence
    from stablediff.evaluation.digit_features import features
    from stablediff.evaluation.frechet import frechet_distance, kernel_inception_distance
    from stablediff.inference.pipeline import images_to_array

    digit_of = {prompt: digit for digit, prompt in prompts.items()}

    def metric(images: list[Image.Image], image_prompts: list[str]) -> dict[str, float]:
        pixels = images_to_array(images)
        generated = features(pixels)
        with warnings.catch_warnings():  # the sample count is in the results; the warning would repeat per cell
            warnings.simplefilter("ignore", SampleCountWarning)
            fd = frechet_distance(generated, reference_features)
        kid = kernel_inception_distance(generated, reference_features, num_subsets=kid_subsets)
        report = adherence(pixels, np.array([digit_of[p] for p in image_prompts]), resolution)
        return {"fd": fd.value, "kid": kid.value, "kid_std": kid.spread or 0.0, "adherence": report.adherence,
                "macro_f1": report.scores.macro_f1}

    return metric


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max: what a table of repeats reports (n is small; a mean and std would pretend more)."""
    array = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(array)), "min": float(array.min()), "max": float(array.max()),
            "n": int(len(array))}


def summarize(cells: Sequence[SweepCell]) -> list[dict]:
    """One row per (sampler, steps), in first-seen order: the spread over repeats of each named value and of
    seconds per generated image."""
    groups: dict[tuple[str, int], list[SweepCell]] = {}
    for cell in cells:
        groups.setdefault((cell.sampler, cell.steps), []).append(cell)
    rows = []
    for (sampler, steps), group in groups.items():
        names = group[0].values or {"value": group[0].value}
        rows.append({"sampler": sampler, "steps": steps, "count": group[0].count, "repeats": len(group),
                     "metrics": {name: spread([(c.values or {"value": c.value})[name] for c in group])
                                 for name in names},
                     "seconds_per_image": spread([c.generation_seconds / c.count for c in group])})
    return rows
