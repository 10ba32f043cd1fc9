"""The `stablediff` command line: one module per command group, registered here."""

from __future__ import annotations

import os

import click

# Offline by design, and quiet: transformers' import-time notices (e.g. about an
# optional torchvision) are not the user's business.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from stablediff.cli.errors import run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="stablediff")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Train, fine-tune, evaluate and run Stable Diffusion models without losing work."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register() -> None:
    from stablediff.cli import ckpt, data, demo, eval, finetune, generate, lora, report, train

    for command in (train.train, finetune.finetune, demo.demo, generate.generate, eval.eval_cmd, ckpt.group,
                    data.group, lora.group, report.report):
        cli.add_command(command)


_register()


def main() -> None:
    run_cli(cli)
