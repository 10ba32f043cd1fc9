"""The model a fine-tune starts from: a run directory, a diffusers folder or an SD 1.x single file.

`finetune.base` is one of
  RUN_DIR            a stablediff run: its best checkpoint (by val_loss), else its newest
  RUN_DIR@best       the best one (an error when none records val_loss)
  RUN_DIR@latest     the newest that verifies
  RUN_DIR@STEP       that step
  FOLDER             a diffusers StableDiffusionPipeline folder (model_index.json)
  FILE.safetensors   an SD 1.x single file in the original key layout (CLIP text encoder)
Whatever it is, it becomes one StableDiffusionPipeline; the run copies it once into
RUN_DIR/base/ (a diffusers folder) so that resume, export and generate never depend
on the original file staying where it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from stablediff.errors import CheckpointError, ConfigError, MissingPathError, ModelFileError
from stablediff.io.pickle_guard import MODEL_FILE_SUFFIXES
from stablediff.models.finetuned_run import BASE_FOLDER, BASE_RECORD


@dataclass(frozen=True)
class BaseSpec:
    kind: str  # "run" | "diffusers" | "single-file"
    path: Path
    selector: str | None = None  # for runs: "best", "latest" or a step number


@dataclass
class Base:
    pipe: object  # a diffusers StableDiffusionPipeline (eval mode)
    record: dict  # kind, path, name, selector, step, sha256, model_version: what export metadata reports

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    def training_scheduler(self):
        """The DDPM schedule training draws noise from: the base's betas, timesteps and prediction type."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipe.scheduler.config)


def parse_base(spec: str) -> BaseSpec:
    """What kind of model `finetune.base` names; a path that does not exist is a MissingPathError."""
    text, selector = spec, None
    head, sep, tail = spec.rpartition("@")
    if sep and head and (tail in ("best", "latest") or tail.isdigit()):
        text, selector = head, tail
    path = Path(text).expanduser()
    if not path.exists():
        raise MissingPathError(f"finetune.base {spec!r}: {path} does not exist. Give a stablediff run directory "
                               "(RUN_DIR, RUN_DIR@best, RUN_DIR@STEP), a diffusers pipeline folder or an SD 1.x "
                               ".safetensors file")
    if path.is_dir() and (path / "checkpoints" / "manifests").is_dir():
        return BaseSpec("run", path, selector or None)
    if selector is not None:
        raise ConfigError(f"finetune.base {spec!r}: @{selector} picks a checkpoint of a run directory, and {path} "
                          "is not one (no checkpoints/manifests/)")
    if path.is_dir() and (path / "model_index.json").is_file():
        return BaseSpec("diffusers", path)
    if path.is_file() and path.suffix.lower() in MODEL_FILE_SUFFIXES:
        return BaseSpec("single-file", path)
    raise ModelFileError(f"finetune.base {spec!r}: {path} is neither a stablediff run directory (checkpoints/), a "
                         "diffusers pipeline folder (model_index.json) nor a model file (.safetensors)")


def load_base(spec: str, trust_pickle: bool = False, tokenizer: str | None = None) -> Base:
    """The base as a pipeline, with the record of where it came from."""
    parsed = parse_base(spec)
    record = {"kind": parsed.kind, "path": str(parsed.path.resolve()), "name": parsed.path.stem or parsed.path.name,
              "selector": parsed.selector, "step": None, "sha256": None, "model_version": "sd_v1"}
    if parsed.kind == "run":
        pipe, record["step"] = _run_pipeline(parsed, trust_pickle)
    elif parsed.kind == "diffusers":
        pipe = _folder_pipeline(parsed.path, trust_pickle)
    else:
        from stablediff.models.file_hash import file_hashes
        from stablediff.models.single_file_pipeline import load_single_file_pipeline

        pipe = load_single_file_pipeline(parsed.path, trust_pickle, tokenizer=Path(tokenizer) if tokenizer else None)
        import torch

        pipe.to(dtype=torch.float32)  # a half-precision file trains in float32
        record["sha256"] = file_hashes(parsed.path)["sha256"]
    check_architecture(pipe, spec)
    return Base(pipe, record)


def _run_pipeline(parsed: BaseSpec, trust_pickle: bool):
    """A run's checkpoint as a plain pipeline (a fine-tune run's adapters merged into its base)."""
    from stablediff.models.run_export import load_run_checkpoint, pipeline_from_checkpoint

    selector = parsed.selector
    step = int(selector) if selector is not None and selector.isdigit() else None
    try:
        loaded = load_run_checkpoint(parsed.path, step, best=selector == "best", prefer_best=selector is None)
    except CheckpointError as exc:  # its hints name ckpt export's flags; say which finetune.base forms exist
        named = f"{parsed.path}@{selector}" if selector else str(parsed.path)
        raise CheckpointError(f"finetune.base {named}: {str(exc).rstrip('.')}. In finetune.base that is "
                              "RUN_DIR@STEP, RUN_DIR@latest, or RUN_DIR alone (the best, else the newest).") from None
    pipe = pipeline_from_checkpoint(loaded, ema=True, trust_pickle=trust_pickle,
                                    source=f"{parsed.path} step {loaded.step}", run_dir=parsed.path)
    return pipe, loaded.step


def _folder_pipeline(path: Path, trust_pickle: bool):
    from stablediff.models.pipeline_assembly import load_pipeline_folder

    declared = json.loads((path / "model_index.json").read_text()).get("_class_name")
    if declared not in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"):
        raise ModelFileError(f"finetune.base {path} is a {declared}; stablediff fine-tunes Stable Diffusion 1.x-style "
                             "pipelines (StableDiffusionPipeline: UNet2DConditionModel, AutoencoderKL, one text "
                             "encoder). SDXL, SD3 and Flux folders are not supported yet")
    return load_pipeline_folder(path, trust_pickle)


def check_architecture(pipe, spec: str) -> None:
    """A text-to-image UNet with 4 latent channels and a VAE: what the training loop drives."""
    unet = pipe.unet
    if type(unet).__name__ != "UNet2DConditionModel" or getattr(pipe, "vae", None) is None:
        raise ModelFileError(f"finetune.base {spec!r}: a {type(unet).__name__} without a VAE is not a Stable "
                             "Diffusion 1.x-style model; give an SD 1.x checkpoint or a stablediff latent run")
    if unet.config.in_channels != unet.config.out_channels:
        raise ModelFileError(f"finetune.base {spec!r} is an inpainting model ({unet.config.in_channels} input "
                             "channels); fine-tune a text-to-image base instead")
    if unet.config.cross_attention_dim != pipe.text_encoder.config.hidden_size:
        raise ModelFileError(f"finetune.base {spec!r}: the UNet attends to {unet.config.cross_attention_dim}-wide "
                             f"text, its text encoder is {pipe.text_encoder.config.hidden_size} wide")


def save_base(base: Base, run_dir: Path) -> Path:
    """RUN_DIR/base, written once and atomically: a kill leaves no half base."""
    from stablediff.models.atomic_output import save_folder

    def write(tmp: Path) -> None:
        base.pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / BASE_RECORD).write_text(json.dumps(base.record, indent=2) + "\n")

    return save_folder(write, Path(run_dir) / BASE_FOLDER, replace=False)


def load_saved_base(run_dir: Path) -> Base | None:
    """The copy in RUN_DIR/base (what a resumed run trains on), or None before the first start."""
    folder = Path(run_dir) / BASE_FOLDER
    if not (folder / BASE_RECORD).is_file():
        return None
    from stablediff.models.pipeline_assembly import load_pipeline_folder  # seconds: only when there is one

    pipe = load_pipeline_folder(folder)  # our own safetensors copy: nothing to trust
    return Base(pipe, json.loads((folder / BASE_RECORD).read_text()))
