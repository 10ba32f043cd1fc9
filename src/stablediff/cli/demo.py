"""`stablediff demo`: the built-in digits end to end, ending with a prompt-adherence check."""

from __future__ import annotations

import time

import click

from stablediff.cli.locking import claim_run_stores, run_dir_locked
from stablediff.cli.options import allow_config_change_option, config_options, resolve_run

ADHERENCE_SAMPLES_PER_DIGIT = 20
ADHERENCE_SEED = 1000  # disjoint from the sample grid's seeds


@click.command()
@config_options
@allow_config_change_option
def demo(run_dir, overrides, allow_config_change: bool) -> None:
    """Train a small text-to-image model on the built-in digits, write samples, export it, check it."""
    started = time.perf_counter()
    config, run_dir = resolve_run("digits", run_dir if run_dir else None, overrides)
    from stablediff.training.interrupt import STOP

    with STOP.handling():  # also through the adherence check; a stop is reported by cli.errors.run_cli (exit 0)
        with run_dir_locked(run_dir, "stablediff demo"):
            claim_run_stores(run_dir, config.checkpoint.replicas)
            from stablediff.training.run import run_training

            result = run_training(config, run_dir, allow_config_change=allow_config_change)
        report = digit_adherence(result.pipeline, config)  # reads the model in memory: no lock needed
    minutes = (time.perf_counter() - started) / 60
    click.echo(f"samples: {run_dir / 'samples' / 'final.png'}")
    click.echo(f"model (diffusers StableDiffusionPipeline): {result.export_dir}")
    click.echo(f"prompt adherence: {report.adherence:.1%} of {report.count} generated digits read as the digit "
               f"asked for (the same classifier on real held-out digits: {report.reference:.1%})")
    click.echo(f"demo finished in {minutes:.1f} min")


def digit_adherence(pipe, config):
    """Generate ADHERENCE_SAMPLES_PER_DIGIT images for each "a handwritten digit N" prompt and classify them."""
    from stablediff.evaluation.adherence import generated_adherence
    from stablediff.training.interrupt import STOP

    return generated_adherence(pipe, range(10), ADHERENCE_SAMPLES_PER_DIGIT, steps=config.sample.steps,
                               guidance_scale=config.sample.guidance_scale, seed=ADHERENCE_SEED,
                               resolution=config.data.resolution,
                               stop=lambda: STOP.check("while checking prompt adherence",
                                                       "the model is trained, checkpointed and exported"))
