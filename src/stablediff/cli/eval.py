"""`stablediff eval MODEL_OR_RUN_DIR`: measure checkpoints, cache the numbers in eval.json, mark the best.

The metrics and how each is computed are evaluation/registry.py's; their directions are
run_schema.METRIC_MODES'. Evaluating into a run directory holds its lock (a run that is
training refuses with a clear error instead of racing it); `--out DIR` elsewhere evaluates
read-only and writes DIR/eval.json instead.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click

from stablediff.cli.locking import run_dir_locked
from stablediff.cli.options import trust_pickle_option
from stablediff.errors import ConfigError
from stablediff.run_schema import METRIC_MODES

EVAL_HINT = ("wait for it to finish, or evaluate read-only into another folder with --out DIR "
             "(its checkpoints are read, never written)")


def parse_list(text: str | None, option: str, item=str) -> list | None:
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = [item(p) for p in parts]
    except ValueError:
        raise click.BadParameter(f"expected a comma-separated list such as 100,200, got {text!r}",
                                 param_hint=option) from None
    if not values:
        raise click.BadParameter("the list is empty", param_hint=option)
    return values


@click.command(name="eval")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--metrics", default=None, metavar="LIST",
              help=f"Comma-separated, of {','.join(METRIC_MODES)} (default: every one the data and options allow).")
@click.option("--num-samples", type=click.IntRange(1), default=100, show_default=True,
              help="Generated images (fd, kid, adherence, clip) and held-out images (bpd).")
@click.option("--steps", "steps_text", default=None, metavar="LIST",
              help="Run directory: the checkpoint steps to evaluate, e.g. 100,200 (default: every kept one).")
@click.option("--seed", type=click.IntRange(0), default=1000, show_default=True,
              help="First generation seed, and the seed of bpd's and KID's draws.")
@click.option("--sample-steps", type=click.IntRange(1), default=20, show_default=True,
              help="Sampling steps of each generated image.")
@click.option("--guidance", type=float, default=3.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Write DIR/eval.json (default: the run directory's eval.json; a model alone: print only).")
@click.option("--best-metric", default=None, help="Rank checkpoints by this metric (default: fd if computed, "
              "else val_loss; lower or higher is better as the metric says).")
@click.option("--inception", type=click.Path(path_type=Path), default=None,
              help="FID Inception weights (safetensors or TorchScript): fd/kid in Inception space, any data.")
@click.option("--clip", type=click.Path(path_type=Path), default=None, help="Local CLIP model folder: the clip metric.")
@click.option("--data", "data_source", default="builtin:digits", show_default=True,
              help="A diffusers folder or single file: the data it was trained on (a run knows its own).")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Run directory: the EMA or the raw UNet.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@trust_pickle_option
def eval_cmd(target: Path, metrics, num_samples, steps_text, seed, sample_steps, guidance, out_dir, best_metric,
             inception, clip, data_source, ema, as_json, trust_pickle) -> None:
    """Evaluate TARGET (a run directory, diffusers folder or .safetensors file) and, for a run, mark its best
    checkpoint in eval.json, which `ckpt export --best` and `generate --best` follow.

    Results are cached per (checkpoint, metric, settings): running the same command again is instant.
    """
    from stablediff.cli.eval_run import is_run_dir

    names = parse_list(metrics, "--metrics")
    unknown = [n for n in names or [] if n not in METRIC_MODES]
    if unknown:
        raise ConfigError(f"--metrics: unknown metric {', '.join(map(repr, unknown))}; the metrics are "
                          f"{', '.join(METRIC_MODES)}, given as a comma-separated list")
    steps = parse_list(steps_text, "--steps", int)
    if best_metric is not None and best_metric not in METRIC_MODES:
        raise ConfigError(f"--best-metric: {best_metric!r} is no metric; use one of {', '.join(METRIC_MODES)}")
    if not target.exists():
        from stablediff.errors import MissingPathError

        raise MissingPathError(f"{target} does not exist; give a run directory, a diffusers pipeline folder or a "
                               "single-file .safetensors model")
    run = is_run_dir(target)
    if steps is not None and not run:
        raise click.UsageError("--steps picks checkpoints of a run directory, and TARGET is a model")
    writes_run = run and (out_dir is None or out_dir.resolve() == target.resolve())
    if writes_run:
        with run_dir_locked(target, "stablediff eval", EVAL_HINT):
            _run(target, names, steps)
    else:
        _run(target, names, steps)


def _run(target: Path, names: list[str] | None, steps: list[int] | None) -> None:
    """Evaluate and print, with the command line's options (click's parsed parameters)."""
    from stablediff.cli.eval_run import EvalPlan, evaluate_model, evaluate_run, is_run_dir, mark_best
    from stablediff.cli.eval_table import print_results
    from stablediff.evaluation.settings import EvalSettings

    options = click.get_current_context().params
    out_dir, best_metric = options["out_dir"], options["best_metric"]
    settings = EvalSettings(num_samples=options["num_samples"], seed=options["seed"],
                            sample_steps=options["sample_steps"], guidance_scale=options["guidance"],
                            inception=_path(options["inception"]), clip=_path(options["clip"]),
                            weights="ema" if options["ema"] else "raw")
    say = (lambda text: click.echo(text, err=True))
    plan = EvalPlan(names, settings, out_dir, options["ema"], options["trust_pickle"], say)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers' deprecation notices are not the user's
        if is_run_dir(target):
            evaluated, identities = evaluate_run(target, plan, steps)
            mark = mark_best(out_dir or target, identities, best_metric)
        else:
            evaluated, mark = [evaluate_model(target, plan, options["data_source"])], None
    if options["as_json"]:
        click.echo(json.dumps({"best": mark, "results": {e.key: {n: r.to_json() for n, r in e.results.items()}
                                                         for e in evaluated}}, indent=2))
    else:
        print_results(evaluated, mark, say)


def _path(value: Path | None) -> str | None:
    return str(value) if value is not None else None
