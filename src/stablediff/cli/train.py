"""`stablediff train CONFIG`: run a training config end to end."""

from __future__ import annotations

import click

from stablediff.checkpoint.lock import has_run_content
from stablediff.errors import UserError
from stablediff.cli.locking import claim_run_stores, run_dir_locked
from stablediff.cli.options import allow_config_change_option, config_options, resolve_run, trust_pickle_option
from stablediff.cli.preflight import check_run_inputs


@click.command()
@click.argument("config_name", metavar="CONFIG")
@config_options
@click.option("--fresh", is_flag=True, help="Refuse to reuse a non-empty run directory instead of resuming.")
@trust_pickle_option
@allow_config_change_option
def train(config_name: str, run_dir, overrides, fresh: bool, trust_pickle: bool, allow_config_change: bool) -> None:
    """Train the model described by CONFIG (a YAML file or a bundled recipe: digits, tiny)."""
    config, run_dir = resolve_run(config_name, run_dir, overrides)
    check_run_inputs(config, run_dir)  # a missing source or a --run-dir that is a file: before anything
    if fresh and run_dir.is_dir() and has_run_content(run_dir):  # refused before the lock: nothing touched
        raise UserError(f"--fresh: {run_dir} is not empty; choose a new --run-dir or remove it")
    with run_dir_locked(run_dir, "stablediff train"):
        claim_run_stores(run_dir, config.checkpoint.replicas)
        _train(config, run_dir, fresh, trust_pickle, allow_config_change)


def _train(config, run_dir, fresh: bool, trust_pickle: bool, allow_config_change: bool) -> None:
    from stablediff.training.run import run_training

    # A diverged run raises TrainingDiverged, a UserError: run_cli tells it in one paragraph.
    result = run_training(config, run_dir, fresh=fresh, trust_pickle=trust_pickle,
                          allow_config_change=allow_config_change)
    if result is None:  # a torchrun rank other than 0: rank 0 reports
        return
    if result.complete_at is not None:
        click.echo(f"run already complete at step {result.complete_at}; model in {result.export_dir}; "
                   f"samples in {run_dir / 'samples'}")
        return
    click.echo(f"done: final loss {result.final_loss:.4f}; model in {result.export_dir}; "
               f"samples in {run_dir / 'samples'}")
