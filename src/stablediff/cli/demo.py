"""`stablediff demo`: the built-in digits end to end, ending with the final model's scores and the report."""

from __future__ import annotations

import time

import click

from stablediff.cli.locking import claim_run_stores, run_dir_locked
from stablediff.cli.options import allow_config_change_option, config_options, resolve_run

DEMO_METRICS = ["fd", "kid", "adherence"]  # what the demo prints; its recipe evaluates them at each eval step


@click.command()
@config_options
@allow_config_change_option
def demo(run_dir, overrides, allow_config_change: bool) -> None:
    """Train a small text-to-image model on the built-in digits, write samples, export it, score it and write
    its report (RUN_DIR/report.html)."""
    started = time.perf_counter()
    config, run_dir = resolve_run("digits", run_dir if run_dir else None, overrides)
    from stablediff.training.interrupt import STOP

    with STOP.handling():  # also through the scoring; a stop is reported by cli.errors.run_cli (exit 0)
        with run_dir_locked(run_dir, "stablediff demo"):
            claim_run_stores(run_dir, config.checkpoint.replicas)
            from stablediff.training.run import run_training

            result = run_training(config, run_dir, allow_config_change=allow_config_change)
            step, scores = score_final_checkpoint(run_dir, config)
            from stablediff.evaluation.report import write_report

            report = write_report(run_dir)
    click.echo(f"samples: {run_dir / 'samples' / 'final.png'}")
    click.echo(f"model (diffusers StableDiffusionPipeline): {result.export_dir}")
    click.echo(f"report: {report}")
    for line in score_lines(step, scores, config):
        click.echo(line)
    click.echo(f"demo finished in {(time.perf_counter() - started) / 60:.1f} min")


def score_final_checkpoint(run_dir, config) -> tuple[int, dict]:
    """(step, {name: MetricResult}) of the newest checkpoint: DEMO_METRICS with train-time evaluation's
    settings, so a run that evaluated its last step reads them from eval.json instead of generating again."""
    from stablediff.cli.eval_run import EvalPlan, evaluate_run, kept_checkpoints
    from stablediff.training.eval_step import eval_settings

    final = max(kept_checkpoints(run_dir)[2])
    plan = EvalPlan(DEMO_METRICS, eval_settings(config), None, say=lambda text: click.echo(text, err=True))
    (evaluated,), _ = evaluate_run(run_dir, plan, [final])
    return final, evaluated.results


def score_lines(step: int, scores: dict, config) -> list[str]:
    """The model's FD, KID and adherence (accuracy and macro precision/recall/F1), each next to what real
    digits score: as many real training digits for FD/KID, the classifier on real held-out digits."""
    from stablediff.evaluation.digit_reference import real_reference

    fd, kid, adherence = (scores[name] for name in DEMO_METRICS)
    real = real_reference(fd.count, config.data.resolution, seed=kid.settings.get("seed", 0))
    macro, reference = adherence.details["macro"], adherence.details["reference"]
    rows = [("FD (digit features, lower is better)", f"{fd.value:.3g}", f"{real['fd'].value:.3g}"),
            ("KID (lower is better)", f"{kid.value:.3g} ± {kid.spread:.2g}",
             f"{real['kid'].value:.3g} ± {real['kid'].spread:.2g}"),
            ("adherence: accuracy", f"{adherence.value:.1%}", f"{reference['value']:.1%}")]
    rows += [(f"adherence: macro {part}", f"{macro[part]:.3f}", f"{reference['macro'][part]:.3f}")
             for part in ("precision", "recall", "f1")]
    header = (f"step {step}, {fd.count} generated digits", "this model", "real digits")
    width = max(len(row[0]) for row in [header, *rows])
    return [f"{label:<{width}}  {ours:>14}  {theirs:>14}" for label, ours, theirs in [header, *rows]]
