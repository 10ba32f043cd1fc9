"""Sampler/steps sweep: each cell is the metric of what that sampler makes in that many steps, same seeds."""

import math

import numpy as np
import pytest

from stablediff.errors import GenerationError
from stablediff.evaluation.sweep import (SWEEP_SAMPLERS, SweepCell, digit_adherence_metric, digit_distribution_metric,
                                        interleaved_order, repeated_sweep, sampler_sweep, summarize, sweep_table)
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


def pixel_stats(images, prompts) -> dict:
    """A metric of two named numbers."""
    pixels = images_to_array(images)
    return {"mean": float(pixels.mean()), "max": float(pixels.max())}


def test_each_repeat_runs_every_cell_in_a_rotated_sampler_order():
    assert interleaved_order(["a", "b", "c"], [4, 8], 0) == [("a", 4), ("b", 4), ("c", 4), ("a", 8), ("b", 8), ("c", 8)]
    assert interleaved_order(["a", "b", "c"], [4, 8], 1) == [("b", 4), ("c", 4), ("a", 4), ("b", 8), ("c", 8), ("a", 8)]
    assert interleaved_order(["a", "b", "c"], [4], 3) == interleaved_order(["a", "b", "c"], [4], 0)


def test_repeats_have_their_own_seed_blocks_and_each_cell_matches_a_plain_sweep_with_those_seeds(pipe):
    cells = repeated_sweep(pipe, PROMPTS, pixel_stats, repeats=2, seed=50, samplers=["ddim", "euler_a"], steps=[2],
                           per_prompt=2)
    assert [(c.repeat, c.seed, c.sampler) for c in cells] == [(0, 50, "ddim"), (0, 50, "euler_a"),
                                                              (1, 52, "euler_a"), (1, 52, "ddim")]
    again = sampler_sweep(pipe, PROMPTS, pixel_stats, samplers=["euler_a"], steps=[2], per_prompt=2, seed=52)[0]
    assert cells[2].values == again.values and cells[2].value == again.values["mean"]
    assert cells[0].values != cells[3].values  # another seed block, other images
    assert all(0 < c.generation_seconds <= c.seconds for c in cells)


def test_overlapping_seed_blocks_are_refused(pipe):
    with pytest.raises(ValueError, match="seed_stride"):
        repeated_sweep(pipe, PROMPTS, pixel_stats, repeats=2, seed_stride=1, per_prompt=2)


def test_the_summary_is_the_median_and_range_over_repeats_per_cell():
    cells = [SweepCell("ddim", 4, v, 10, 1.0, {"fd": v, "kid": -v}, gen, 1000 + r, r)
             for r, (v, gen) in enumerate([(3.0, 1.0), (1.0, 2.0), (2.0, 4.0)])]
    [row] = summarize(cells)
    assert (row["sampler"], row["steps"], row["count"], row["repeats"]) == ("ddim", 4, 10, 3)
    assert row["metrics"]["fd"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert row["metrics"]["kid"]["median"] == -2.0
    assert row["seconds_per_image"] == {"median": 0.2, "min": 0.1, "max": 0.4, "n": 3}


def test_the_distribution_metric_scores_real_digits_near_zero_and_shuffled_prompts_as_misread():
    from PIL import Image

    from stablediff.data.digits import load_digits
    from stablediff.evaluation.digit_features import real_features

    train, _ = load_digits(32)
    prompts = {d: f"a handwritten digit {d}" for d in range(10)}
    images = [Image.fromarray(a) for a in train.images[:100]]
    metric = digit_distribution_metric(prompts, real_features("held_out"), kid_subsets=10)
    real = metric(images, [prompts[int(d)] for d in train.labels[:100]])
    noise = metric([Image.fromarray(a) for a in np.random.default_rng(0).integers(0, 256, (100, 32, 32, 3),
                                                                                   dtype=np.uint8)],
                   [prompts[int(d)] for d in train.labels[:100]])
    assert set(real) == {"fd", "kid", "kid_std", "adherence", "macro_f1"}
    assert real["adherence"] > 0.95 and real["macro_f1"] > 0.95
    assert real["fd"] < noise["fd"] / 10 and real["kid"] < noise["kid"] / 10
    shuffled = metric(images, [prompts[(int(d) + 1) % 10] for d in train.labels[:100]])
    assert shuffled["adherence"] < 0.05 and shuffled["fd"] == real["fd"]  # FD does not read the prompts


def test_a_batched_cell_makes_the_per_prompt_images_up_to_rounding(pipe):
    seen = []

    def keep(images, prompts):
        seen.append((images_to_array(images).astype(int), list(prompts)))
        return float(seen[-1][0].mean())

    for batched in (False, True):
        sampler_sweep(pipe, PROMPTS, keep, samplers=["euler_a"], steps=[3], per_prompt=2, batched=batched)
    (per_prompt, prompts), (together, batched_prompts) = seen
    assert batched_prompts == prompts == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    assert np.abs(together - per_prompt).max() <= 2  # ancestral noise too comes from each image's seed
    assert np.abs(together[0] - together[1]).mean() > 10  # and the images do differ from one another
