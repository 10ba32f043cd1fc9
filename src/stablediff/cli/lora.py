"""`stablediff lora check FILE`: will a LoRA file load in AUTOMATIC1111, ComfyUI and diffusers, and what is dropped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.group(name="lora")
def group() -> None:
    """Inspect LoRA files."""


@group.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(path_type=Path, exists=True), default=None,
              help="The model the LoRA is for (diffusers folder or SD single file); default: the SD 1.5 architecture.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def check(file: Path, base: Path | None, as_json: bool) -> None:
    """Which keys of FILE each loader loads and which it silently skips, with why.

    Exit status 0 when AUTOMATIC1111, ComfyUI and diffusers each load every key,
    1 otherwise (usable as a gate in CI). Nothing is downloaded: without --base
    the layers are SD 1.5's, built without weights.
    """
    from stablediff.finetune.lora_check import check_lora, read_lora_shapes, report_json, report_lines
    from stablediff.finetune.lora_targets import base_targets, sd15_targets

    read_lora_shapes(file)  # a missing or non-LoRA file is refused before the model is built
    result = check_lora(file, base_targets(base) if base else sd15_targets())
    if as_json:
        click.echo(json.dumps(report_json(result), indent=2))
    else:
        click.echo(f"{file}: {result.keys} keys, checked against {result.base}")
        for line in report_lines(result):
            click.echo(line)
    if not result.ok:
        sys.exit(1)
