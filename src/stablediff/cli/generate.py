"""`stablediff generate MODEL PROMPT`: txt2img, img2img (--init) and inpainting (--init --mask).

`stablediff generate --from-png IMG [MODEL]` makes an image again from the
parameters in its PNG metadata; `--list-samplers` says which samplers exist.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass, fields
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


def print_samplers(ctx: click.Context, _param, value: bool) -> None:
    """`--list-samplers`: eager, like --help, so it answers whatever else the command line holds."""
    if not value or ctx.resilient_parsing:
        return
    from stablediff.inference.schedulers import DEFAULT_SAMPLER, SAMPLERS

    width = max(len(name) for name in SAMPLERS)
    for sampler in SAMPLERS.values():
        default = " [default]" if sampler.name == DEFAULT_SAMPLER else ""
        needs = f" (needs {sampler.requires})" if sampler.requires else ""
        click.echo(f"{sampler.name:<{width}}  {sampler.class_name:<32} {sampler.description}{needs}{default}")
    ctx.exit()


@dataclass(frozen=True)
class GenerationOptions:
    """What the command line says about the images to make, as given: `request(prompt)` turns the settings
    into the GenerationRequest the Python API and the server take; the init image and mask are inputs."""

    negative: str | None
    steps: int
    sampler: str
    guidance: float
    seed: int
    num: int
    size: str | None  # "WxH"
    init_image: Path | None
    strength: float | None
    mask: Path | None
    loras: tuple[str, ...]  # "PATH[:SCALE]"
    embeddings: tuple[str, ...]  # textual-inversion files

    def check_inputs(self) -> None:
        if self.mask is not None and self.init_image is None:
            raise click.UsageError("--mask needs --init, the image to paint into")
        if self.strength is not None and self.init_image is None:
            raise click.UsageError("--strength applies to img2img and inpainting; give --init IMG")

    def request(self, prompt: str, trust_pickle: bool = False):
        from stablediff.inference.embeddings import parse_embedding_arg
        from stablediff.inference.lora import parse_lora_arg
        from stablediff.inference.request import GenerationRequest

        return GenerationRequest(prompt, negative_prompt=self.negative, steps=self.steps, sampler=self.sampler,
                                 guidance_scale=self.guidance, seed=self.seed, num=self.num,
                                 size=parse_size(self.size), strength=self.strength,
                                 loras=tuple(parse_lora_arg(text, run_lora) for text in self.loras),
                                 embeddings=tuple(parse_embedding_arg(text, trust_pickle) for text in self.embeddings))


def run_lora(path: Path) -> Path:
    """`--lora RUN_DIR[:SCALE]`: a fine-tune run stands for its best checkpoint's LoRA file."""
    if not (path / "checkpoints" / "manifests").is_dir():
        return path
    from stablediff.finetune.lora_files import run_lora_file

    return run_lora_file(path)


GENERATION_OPTIONS = (
    click.option("--negative", default=None, help="Negative prompt."),
    click.option("--steps", default=20, show_default=True, type=click.IntRange(1, 1000)),
    click.option("--scheduler", "--sampler", "sampler", default="dpmpp_2m", show_default=True, metavar="NAME",
                 help="Sampler; see --list-samplers."),
    click.option("--guidance", default=3.0, show_default=True, type=click.FloatRange(0), help="CFG scale."),
    click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Image i uses seed + i."),
    click.option("--num", default=1, show_default=True, type=click.IntRange(1, 256), help="Images to make."),
    click.option("--size", default=None, metavar="WxH",
                 help="Image size (default: the model's, or the init image's)."),
    click.option("--init", "init_image", type=click.Path(path_type=Path), default=None,
                 help="img2img: start from this image."),
    click.option("--strength", default=None, type=float, help="img2img/inpaint: how much to redraw, 0-1 [0.75]."),
    click.option("--mask", type=click.Path(path_type=Path), default=None,
                 help="Inpaint: white = redraw, black = keep (needs --init)."),
    click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
                 help="A LoRA file, or a LoRA fine-tune's run directory (its best checkpoint), to apply (repeatable)."),
    click.option("--embedding", "embeddings", multiple=True, metavar="FILE",
                 help="A textual-inversion embedding (repeatable); its file name stem is the prompt word."),
)


def generation_options(command):
    """The generation options, handed to `command` as one GenerationOptions argument `options`."""
    names = [field.name for field in fields(GenerationOptions)]

    @functools.wraps(command)
    def with_options(**kwargs):
        options = GenerationOptions(**{name: kwargs.pop(name) for name in names})
        return command(options=options, **kwargs)

    for option in reversed(GENERATION_OPTIONS):
        with_options = option(with_options)
    return with_options


@dataclass(frozen=True)
class ImageOutput:
    """Where the PNGs go (`--out`) and whether they record absolute paths (`--embed-paths`)."""

    folder: Path
    embed_paths: bool = False

    def check(self) -> None:
        check_folder_target(self.folder, "--out")  # before any model is loaded

    def write(self, images, seed: int) -> None:
        from stablediff.inference.api import save_png

        self.folder.mkdir(parents=True, exist_ok=True)
        start = next_index(self.folder)
        for i, image in enumerate(images):
            click.echo(str(save_png(image, self.folder / f"{start + i:05d}-{seed + i}.png", self.embed_paths)))


def image_output(command):
    """`--out` and `--embed-paths`, handed to `command` as one ImageOutput argument `output`."""

    @functools.wraps(command)
    def with_output(out: Path, embed_paths: bool, **kwargs):
        return command(output=ImageOutput(out, embed_paths), **kwargs)

    with_output = click.option(
        "--embed-paths", is_flag=True, help="Record absolute paths of the model, LoRAs and images in the "
        "PNG (default: relative to --out, so shared images do not reveal your folders).")(with_output)
    return click.option("--out", type=click.Path(path_type=Path), default=Path("outputs"),
                        show_default=True)(with_output)


@click.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.argument("prompt", required=False)
@generation_options
@click.option("--step", type=click.IntRange(0), default=None, help="Run directory: use the checkpoint of this step.")
@click.option("--best", is_flag=True, help="Run directory: use the best checkpoint.")
@click.option("--from-png", "from_png", type=click.Path(path_type=Path), default=None,
              help="Make the image in this PNG again from its metadata.")
@click.option("--list-samplers", is_flag=True, is_eager=True, expose_value=False, callback=print_samplers,
              help="List the samplers and exit.")
@image_output
@trust_pickle_option
def generate(model, prompt, options: GenerationOptions, step, best, from_png, output: ImageOutput,
             trust_pickle: bool) -> None:
    """Generate images for PROMPT with MODEL (a run directory, diffusers folder or .safetensors file).

    The same seed gives the same image on any device; each PNG carries its parameters (A1111 infotext).
    """
    if from_png is not None:
        if prompt is not None:
            raise click.UsageError("with --from-png give at most MODEL; the prompt comes from the image")
        check_from_png_model(model)
        output.check()
        regenerate(from_png, model, options, step, best, output, trust_pickle)
        return
    if model is None or prompt is None:
        raise click.UsageError("give MODEL and PROMPT (or --from-png IMG, or --list-samplers)")
    options.check_inputs()
    request = options.request(prompt, trust_pickle)
    if options.init_image is not None and not options.init_image.is_file():
        raise UserError(f"init image {options.init_image} does not exist; give the path of a PNG or JPEG image")
    output.check()
    loaded = load_model(model, step, best, trust_pickle)
    output.write(run_request(loaded, request, options.init_image, options.mask), request.seed)


def load_model(model: Path, step: int | None, best: bool, trust_pickle: bool):
    from stablediff.inference.api import load_pipeline

    loaded = load_pipeline(model, step=step, best=best, trust_pickle=trust_pickle)
    if loaded.source.note:  # e.g. a run whose export is older than its newest checkpoint
        click.echo(f"note: {loaded.source.note}", err=True)
    return loaded


def run_request(loaded, request, init_image, mask) -> list:
    """The request's images; what of the prompt the text encoder cannot read is told first, on stderr."""
    from stablediff.inference.prompts import TruncatedPromptWarning

    for message in loaded.prompt_warnings(request):
        click.secho(f"warning: {message}", fg="yellow", err=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncatedPromptWarning)  # told above, once
        return loaded.generate(request, init_image=init_image, mask=mask)


def regenerate(png: Path, model, options: GenerationOptions, step, best, output: ImageOutput,
               trust_pickle: bool) -> None:
    """Make the image in `png` again; MODEL, --lora, --embedding, --init, --mask override where its metadata says
    they were."""
    from stablediff.inference.lora import parse_lora_arg
    from stablediff.inference.recreate import plan_recreation

    # A scale given with --lora is ignored here: the image's own LoRA weights are what re-create it.
    lora_paths = tuple(parse_lora_arg(text).path for text in options.loras)
    plan = plan_recreation(png, model, lora_paths, options.init_image, options.mask, step, best,
                           embedding_paths=tuple(Path(text).expanduser() for text in options.embeddings),
                           trust_pickle=trust_pickle)
    loaded = load_model(plan.model, plan.step, plan.best, trust_pickle)
    if plan.model_hash and plan.model_hash != loaded.model_hash:
        click.secho(f"warning: {png} was made with model hash {plan.model_hash}, {plan.model} has "
                    f"{loaded.model_hash}; the image will differ", fg="yellow", err=True)
    images = run_request(loaded, plan.request, plan.init_image, plan.mask)
    output.write(images, plan.request.seed)
