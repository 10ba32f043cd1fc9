"""`stablediff generate MODEL PROMPT`: text-to-image from a run directory or a diffusers folder."""

from __future__ import annotations

import re
from pathlib import Path

import click

from stablediff.cli.errors import UserError
from stablediff.cli.options import trust_pickle_option


def parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"(\d+)[xX](\d+)", text)
    if not match:
        raise click.BadParameter(f"expected WIDTHxHEIGHT such as 32x32, got {text!r}", param_hint="--size")
    return int(match[1]), int(match[2])


def resolve_model(model: Path) -> Path:
    """A run directory means its exported pipeline; a diffusers folder is used as is."""
    if (model / "model_index.json").is_file():
        return model
    exported = model / "export" / "diffusers"
    if (exported / "model_index.json").is_file():
        return exported
    if not model.exists():
        raise UserError(f"model {model} does not exist; give a run directory or a diffusers pipeline folder")
    raise UserError(f"{model} is neither a diffusers pipeline folder (model_index.json) nor a run directory "
                    "with export/diffusers; train one with `stablediff demo` or `stablediff train`")


def next_index(out: Path) -> int:
    numbers = [int(p.name[:5]) for p in out.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    return max(numbers, default=-1) + 1


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--negative", default=None, help="Negative prompt.")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--guidance", default=3.0, show_default=True, type=click.FloatRange(0), help="CFG scale.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--num", default=1, show_default=True, type=click.IntRange(1, 256), help="Images to make.")
@click.option("--size", default=None, metavar="WxH", help="Image size (default: the model's).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("outputs"), show_default=True)
@trust_pickle_option
def generate(model: Path, prompt: str, negative, steps, guidance, seed, num, size, out: Path,
             trust_pickle: bool) -> None:
    """Generate images for PROMPT with MODEL (DPM-Solver++ sampler). The same seed gives the same image."""
    wh = parse_size(size)
    folder = resolve_model(model)
    from stablediff.inference.metadata import infotext, png_info
    from stablediff.inference.pipeline import load_pipeline_folder, txt2img

    pipe = load_pipeline_folder(folder, trust_pickle)
    images = txt2img(pipe, prompt, negative_prompt=negative, steps=steps, guidance_scale=guidance,
                     seed=seed, num=num, size=wh)
    out.mkdir(parents=True, exist_ok=True)
    start = next_index(out)
    for i, image in enumerate(images):
        params = {"Steps": steps, "Sampler": "dpmpp_2m", "CFG scale": guidance, "Seed": seed + i,
                  "Size": f"{image.width}x{image.height}", "Model": folder.name if folder.name != "diffusers"
                  else folder.parent.parent.name}
        path = out / f"{start + i:05d}-{seed + i}.png"
        image.save(path, pnginfo=png_info(infotext(prompt, negative, params)))
        click.echo(str(path))
