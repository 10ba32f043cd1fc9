"""`stablediff finetune CONFIG`: fine-tune a base model (full, LoRA, frozen layers) with the training run's
checkpoints, lock, guard, resume and early stopping."""

from __future__ import annotations

import click

from stablediff.cli.locking import claim_run_stores, run_dir_locked
from stablediff.cli.options import allow_config_change_option, config_options, resolve_run, trust_pickle_option
from stablediff.cli.preflight import check_run_inputs


@click.command()
@click.argument("config_name", metavar="CONFIG")
@config_options
@trust_pickle_option
@allow_config_change_option
def finetune(config_name: str, run_dir, overrides, trust_pickle: bool, allow_config_change: bool) -> None:
    """Fine-tune finetune.base as CONFIG says (a YAML file or a bundled recipe: digits-lora-nine, sd15-lora).

    The base is a stablediff run directory (RUN_DIR, RUN_DIR@best, RUN_DIR@STEP), a diffusers folder or an
    SD 1.x .safetensors file; it is copied into RUN_DIR/base once. A LoRA run's checkpoints hold only the
    adapters. Export with `stablediff ckpt export RUN_DIR` (the best checkpoint by default)."""
    from stablediff.finetune.base import BASE_FOLDER, parse_base
    from stablediff.finetune.plan import plan_finetune

    config, run_dir = resolve_run(config_name, run_dir, overrides)
    if config.finetune is not None and not (run_dir / BASE_FOLDER).is_dir():
        parse_base(config.finetune.base)  # a base that is not there fails now, not after the data check
    check_run_inputs(config, run_dir)
    plan = plan_finetune(config, run_dir, trust_pickle)  # the base loads and the config fits it: before any write
    with run_dir_locked(run_dir, "stablediff finetune"):
        claim_run_stores(run_dir, config.checkpoint.replicas)
        _finetune(plan, run_dir, trust_pickle, allow_config_change)


def _finetune(plan, run_dir, trust_pickle: bool, allow_config_change: bool) -> None:
    from stablediff.finetune.run import run_finetune

    result = run_finetune(plan, run_dir, trust_pickle=trust_pickle, allow_config_change=allow_config_change)
    if result.complete_at is not None:
        click.echo(f"run already complete at step {result.complete_at}; samples in {run_dir / 'samples'}")
        return
    how = f"stopped early ({result.stop_reason})" if result.stop_reason else "done"
    click.echo(f"{how}: final loss {result.final_loss:.4f}; samples in {run_dir / 'samples'}; export with "
               f"`stablediff ckpt export {run_dir}`")
