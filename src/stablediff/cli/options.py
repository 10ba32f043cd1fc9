"""Options shared by the commands that run a config."""

from __future__ import annotations

from pathlib import Path

import click

from stablediff.config import RunConfig, load_config


def config_options(func):
    func = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help="Override a config value, e.g. --set train.max_steps=100 (repeatable).")(func)
    func = click.option("--run-dir", type=click.Path(path_type=Path), default=None,
                        help="Where the run writes everything (default: config's run_dir or runs/<config name>).")(func)
    return func


def resolve_run(config_name: str, run_dir: Path | None, overrides: tuple[str, ...]) -> tuple[RunConfig, Path]:
    """Validate the config (before any work) and decide the run directory."""
    config = load_config(config_name, list(overrides))
    if run_dir is None:
        run_dir = Path(config.run_dir) if config.run_dir else Path("runs") / Path(config_name).stem
    config.run_dir = str(run_dir)
    return config, run_dir


trust_pickle_option = click.option(
    "--trust-pickle", is_flag=True,
    help="Allow loading pickle-based weights (.bin/.ckpt/.pt); they can run code, so only for files you trust.")

allow_config_change_option = click.option(
    "--allow-config-change", is_flag=True,
    help="Resume even though the config (or data, or text encoder) changes what the run trains, e.g. "
         "data.source or unet.*; the change is recorded in metrics.jsonl and the checkpoint.")
