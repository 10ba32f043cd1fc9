"""Sampler/steps sweep: each cell is the metric of what that sampler makes in that many steps, same seeds."""

import math

import numpy as np
import pytest

from stablediff.errors import GenerationError
from stablediff.evaluation.sweep import SWEEP_SAMPLERS, SweepCell, digit_adherence_metric, sampler_sweep, sweep_table
from stablediff.inference.pipeline import images_to_array, txt2img
from stablediff.inference.schedulers import make_scheduler
from tests.models.tiny_sd import tiny_pipeline

PROMPTS = ["a handwritten digit one", "a handwritten digit seven"]


def mean_pixel(images, prompts) -> float:
    """A cheap metric that sees every pixel: it changes whenever the images do."""
    return float(images_to_array(images).mean())


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def cells(pipe):
    return sampler_sweep(pipe, PROMPTS, mean_pixel, steps=(2, 3), per_prompt=2)


def test_one_cell_per_sampler_and_step_count_in_order(cells):
    assert [(c.sampler, c.steps) for c in cells] == [(s, n) for s in SWEEP_SAMPLERS for n in (2, 3)]
    assert all(c.count == 4 and math.isfinite(c.value) and c.seconds > 0 for c in cells)


def test_a_cell_is_the_metric_of_that_sampler_at_that_many_steps_from_the_fixed_seeds(pipe, cells):
    original = pipe.scheduler
    pipe.scheduler = make_scheduler("euler_a", dict(original.config), 3)
    try:
        images = [im for p in PROMPTS for im in txt2img(pipe, p, steps=3, seed=1000, num=2)]
    finally:
        pipe.scheduler = original
    cell = next(c for c in cells if (c.sampler, c.steps) == ("euler_a", 3))
    assert cell.value == mean_pixel(images, None)


def test_samplers_and_step_counts_make_different_images(cells):
    assert len({c.value for c in cells}) > len(cells) // 2


def test_the_sweep_is_deterministic_and_restores_the_pipelines_scheduler(pipe, cells):
    before = pipe.scheduler
    again = sampler_sweep(pipe, PROMPTS, mean_pixel, samplers=["euler_a"], steps=(2, 3), per_prompt=2)
    assert [c.value for c in again] == [c.value for c in cells if c.sampler == "euler_a"]  # ancestral: seeded noise
    assert pipe.scheduler is before


def test_the_metric_is_told_each_images_prompt(pipe):
    seen = []
    sampler_sweep(pipe, PROMPTS, lambda images, prompts: seen.append(list(prompts)) or 0.0, samplers=["ddim"],
                  steps=[2], per_prompt=2)
    assert seen == [[PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]]


def test_an_unknown_sampler_fails_before_any_image_is_made(pipe):
    calls = []
    with pytest.raises(GenerationError, match="unknown sampler 'nope'"):
        sampler_sweep(pipe, PROMPTS, lambda images, prompts: calls.append(1) or 0.0, samplers=["ddim", "nope"])
    assert not calls


def test_the_table_has_a_row_per_step_count_and_a_column_per_sampler():
    cells = [SweepCell("ddim", 4, 0.5, 10, 1.0), SweepCell("ddim", 8, 0.75, 10, 1.0),
             SweepCell("unipc", 4, 0.25, 10, 1.0)]
    assert sweep_table(cells, digits=2).splitlines() == [
        "| steps | ddim | unipc |", "|---:|---:|---:|", "| 4 | 0.50 | 0.25 |", "| 8 | 0.75 |  |"]


def test_the_digit_metric_reads_the_requested_digit_from_the_prompt():
    from stablediff.data.digits import load_digits
    from PIL import Image

    _, held = load_digits(32)
    ones, sevens = held.images[held.labels == 1][:5], held.images[held.labels == 7][:5]
    images = [Image.fromarray(a) for a in np.concatenate([ones, sevens])]
    metric = digit_adherence_metric({1: PROMPTS[0], 7: PROMPTS[1]})
    assert metric(images, [PROMPTS[0]] * 5 + [PROMPTS[1]] * 5) == 1.0
    assert metric(images, [PROMPTS[1]] * 5 + [PROMPTS[0]] * 5) == 0.0  # swapped prompts: every image misread
