"""`stablediff generate MODEL PROMPT`: txt2img, img2img (--init) and inpainting (--init --mask).

`stablediff generate --from-png IMG [MODEL]` makes an image again from the
parameters in its PNG metadata; `--list-samplers` says which samplers exist.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import click

from stablediff.errors import UserError
from stablediff.cli.options import trust_pickle_option
from stablediff.cli.preflight import check_folder_target


def parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"(\d+)[xX](\d+)", text)
    if not match:
        raise click.BadParameter(f"expected WIDTHxHEIGHT such as 32x32, got {text!r}", param_hint="--size")
    from stablediff.inference.request import check_size_limit

    size = int(match[1]), int(match[2])
    try:
        check_size_limit(size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--size") from None
    return size


def check_from_png_model(model: Path | None) -> None:
    # `--from-png IMG "a cat"` puts the words where MODEL goes; say so instead of looking for a model "a cat".
    if model is not None and not model.exists():
        raise click.UsageError(f"with --from-png the prompt and settings come from the image, and the only "
                               f"argument is an optional MODEL; {str(model)!r} is no model file or folder")


def next_index(out: Path) -> int:
    numbers = [int(p.name[:5]) for p in out.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    return max(numbers, default=-1) + 1


def print_samplers() -> None:
    from stablediff.inference.schedulers import DEFAULT_SAMPLER, SAMPLERS

    width = max(len(name) for name in SAMPLERS)
    for sampler in SAMPLERS.values():
        default = " [default]" if sampler.name == DEFAULT_SAMPLER else ""
        needs = f" (needs {sampler.requires})" if sampler.requires else ""
        click.echo(f"{sampler.name:<{width}}  {sampler.class_name:<32} {sampler.description}{needs}{default}")


@click.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.argument("prompt", required=False)
@click.option("--negative", default=None, help="Negative prompt.")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--scheduler", "--sampler", "sampler", default="dpmpp_2m", show_default=True, metavar="NAME",
              help="Sampler; see --list-samplers.")
@click.option("--guidance", default=3.0, show_default=True, type=click.FloatRange(0), help="CFG scale.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Image i uses seed + i.")
@click.option("--num", default=1, show_default=True, type=click.IntRange(1, 256), help="Images to make.")
@click.option("--size", default=None, metavar="WxH", help="Image size (default: the model's, or the init image's).")
@click.option("--init", "init_image", type=click.Path(path_type=Path), default=None,
              help="img2img: start from this image.")
@click.option("--strength", default=None, type=float, help="img2img/inpaint: how much to redraw, 0-1 [0.75].")
@click.option("--mask", type=click.Path(path_type=Path), default=None,
              help="Inpaint: white = redraw, black = keep (needs --init).")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]", help="A LoRA to apply (repeatable).")
@click.option("--step", type=click.IntRange(0), default=None, help="Run directory: use the checkpoint of this step.")
@click.option("--best", is_flag=True, help="Run directory: use the best checkpoint.")
@click.option("--from-png", "from_png", type=click.Path(path_type=Path), default=None,
              help="Make the image in this PNG again from its metadata.")
@click.option("--list-samplers", is_flag=True, help="List the samplers and exit.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("outputs"), show_default=True)
@click.option("--embed-paths", is_flag=True, help="Record absolute paths of the model, LoRAs and images in the "
              "PNG (default: relative to --out, so shared images do not reveal your folders).")
@trust_pickle_option
def generate(model, prompt, negative, steps, sampler, guidance, seed, num, size, init_image, strength, mask,
             loras, step, best, from_png, list_samplers: bool, out: Path, embed_paths: bool,
             trust_pickle: bool) -> None:
    """Generate images for PROMPT with MODEL (a run directory, diffusers folder or .safetensors file).

    The same seed gives the same image on any device; each PNG carries its parameters (A1111 infotext).
    """
    if list_samplers:
        print_samplers()
        return
    if from_png is not None:
        if prompt is not None:
            raise click.UsageError("with --from-png give at most MODEL; the prompt comes from the image")
        check_from_png_model(model)
        check_folder_target(out, "--out")  # before any model is loaded
        regenerate(from_png, model, out, loras, init_image, mask, step, best, trust_pickle, embed_paths)
        return
    if model is None or prompt is None:
        raise click.UsageError("give MODEL and PROMPT (or --from-png IMG, or --list-samplers)")
    if mask is not None and init_image is None:
        raise click.UsageError("--mask needs --init, the image to paint into")
    if strength is not None and init_image is None:
        raise click.UsageError("--strength applies to img2img and inpainting; give --init IMG")
    from stablediff.inference.api import load_pipeline
    from stablediff.inference.lora import parse_lora_arg
    from stablediff.inference.request import GenerationRequest

    request = GenerationRequest(prompt, negative, steps, sampler, guidance, seed, num, parse_size(size),
                                strength, tuple(parse_lora_arg(text) for text in loras))
    if init_image is not None and not init_image.is_file():
        raise UserError(f"init image {init_image} does not exist; give the path of a PNG or JPEG image")
    check_folder_target(out, "--out")  # before any model is loaded
    loaded = load_pipeline(model, step=step, best=best, trust_pickle=trust_pickle)
    if loaded.source.note:  # e.g. a run whose export is older than its newest checkpoint
        click.echo(f"note: {loaded.source.note}", err=True)
    write_images(run_request(loaded, request, init_image, mask), out, seed, embed_paths)


def run_request(loaded, request, init_image, mask) -> list:
    """The request's images; what of the prompt the text encoder cannot read is told first, on stderr."""
    from stablediff.inference.prompts import TruncatedPromptWarning

    for message in loaded.prompt_warnings(request):
        click.secho(f"warning: {message}", fg="yellow", err=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncatedPromptWarning)  # told above, once
        return loaded.generate(request, init_image=init_image, mask=mask)


def write_images(images, out: Path, seed: int, embed_paths: bool = False) -> None:
    from stablediff.inference.api import save_png

    out.mkdir(parents=True, exist_ok=True)
    start = next_index(out)
    for i, image in enumerate(images):
        click.echo(str(save_png(image, out / f"{start + i:05d}-{seed + i}.png", embed_paths)))


def regenerate(png: Path, model, out: Path, loras, init_image, mask, step, best, trust_pickle: bool,
               embed_paths: bool = False) -> None:
    """Make the image in `png` again; MODEL, --lora, --init, --mask override where its metadata says they were."""
    from stablediff.inference.api import load_pipeline
    from stablediff.inference.lora import parse_lora_arg
    from stablediff.inference.recreate import plan_recreation

    # A scale given with --lora is ignored here: the image's own LoRA weights are what re-create it.
    lora_paths = tuple(parse_lora_arg(text).path for text in loras)
    plan = plan_recreation(png, model, lora_paths, init_image, mask, step, best)
    loaded = load_pipeline(plan.model, step=plan.step, best=plan.best, trust_pickle=trust_pickle)
    if loaded.source.note:
        click.echo(f"note: {loaded.source.note}", err=True)
    if plan.model_hash and plan.model_hash != loaded.model_hash:
        click.secho(f"warning: {png} was made with model hash {plan.model_hash}, {plan.model} has "
                    f"{loaded.model_hash}; the image will differ", fg="yellow", err=True)
    images = run_request(loaded, plan.request, plan.init_image, plan.mask)
    write_images(images, out, plan.request.seed, embed_paths)

