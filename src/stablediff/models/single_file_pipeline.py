"""Single-file SD models (`.safetensors`, or trusted `.ckpt`): load as a pipeline, save from one.

Our exports keep the original SD key layout (see keymap.py), so other tools
read them, and add the exact diffusers configs, text encoder config, tokenizer
files and scheduler to the safetensors metadata (`stablediff.*` keys), so a
round trip gives back the very same pipeline. Files from other tools have no
such metadata; their architecture is inferred from the tensors
(architecture.py) and the scheduler gets SD's training schedule.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel

from stablediff.errors import ModelFileError
from stablediff.models import architecture
from stablediff.models.keymap import Layout, UNetLayout, VAELayout, diffusers_to_original, original_to_diffusers, \
    text_encoder_kind
from stablediff.models.state_dict_file import META, read_model_file
from stablediff.models.text_from_file import build_text_encoder, text_encoder_metadata

# SD 1.x/2.x training schedule (the CompVis configs), used when a file does not say.
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
               "set_alpha_to_one": False, "steps_offset": 1}
_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def load_single_file_pipeline(path: Path, trust_pickle: bool = False, *, tokenizer: Path | None = None,
                              dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
    """A pipeline from one SD 1.x/2.x file; `tokenizer` is a local folder for CLIP files without one.

    Tensors keep the file's dtype unless `dtype` is given. 9 input channels give
    diffusers' inpainting pipeline.
    """
    path = Path(path)
    state, metadata = read_model_file(path, trust_pickle)
    return pipeline_from_state(state, metadata, str(path), tokenizer=tokenizer, dtype=dtype)


def pipeline_from_state(state: dict[str, torch.Tensor], metadata: dict[str, str], source: str, *,
                        tokenizer: Path | None = None, dtype: torch.dtype | None = None):
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    architecture.require_components(shapes, source)
    kind = architecture.text_encoder_kind(shapes)
    if kind == "open_clip":
        raise ModelFileError(f"{source} is an SD 2.x file with an OpenCLIP text encoder (cond_stage_model.model.*), "
                             "which stablediff cannot load yet. Convert it to a diffusers folder with diffusers' own "
                             "conversion script and give that folder instead.")
    unet_cfg, vae_cfg = architecture.model_configs(metadata, shapes)
    layout = Layout(UNetLayout.from_config(unet_cfg), VAELayout.from_config(vae_cfg),
                    "clip" if kind == "clip" else "hf")
    parts = original_to_diffusers(state, layout)
    with torch.device("meta"):  # no random init of weights that are replaced next (seconds for a real SD UNet)
        unet, vae = UNet2DConditionModel.from_config(unet_cfg), AutoencoderKL.from_config(vae_cfg)
    unet = load_weights(unet, parts["unet"], "UNet", source)
    vae = load_weights(vae, parts["vae"], "VAE", source)
    text_model, text_tokenizer = build_text_encoder(kind, parts["text_encoder"], metadata, shapes, source, tokenizer)
    load_weights(text_model, fit_text_keys(text_model, parts["text_encoder"]), "text encoder", source)
    for module, name in ((unet, "unet"), (vae, "vae"), (text_model, "text_encoder")):
        target = dtype or _file_dtype(parts[name])
        if module.dtype != target:  # .to() only when needed: diffusers warns on every cast
            module.to(target)
        module.eval()
    scheduler = scheduler_from_metadata(metadata)
    return make_pipeline(unet, vae, text_model, text_tokenizer, scheduler)


def scheduler_from_metadata(metadata: dict[str, str]):
    import diffusers

    from stablediff.models.pipeline_assembly import default_scheduler

    stored = json.loads(metadata.get(META + "scheduler", "null"))
    if not stored:
        return default_scheduler(SD_SCHEDULE)
    name = stored["class"]
    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if cls is None:
        raise ModelFileError(f"the file's metadata names an unknown scheduler {name!r}; remove the "
                             f"'{META}scheduler' metadata entry to use the default")
    return cls.from_config(stored["config"])


def make_pipeline(unet, vae, text_encoder, tokenizer, scheduler):
    cls = StableDiffusionInpaintPipeline if unet.config.in_channels == 9 else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _file_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    floats = {t.dtype for t in tensors.values() if t.is_floating_point()}
    return floats.pop() if len(floats) == 1 else torch.float32


def fit_text_keys(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapt CLIP keys to this transformers version: `text_model.` nesting, and position_ids buffers
    that older files carry but current models do not keep in their state dict."""
    expected = set(model.state_dict())
    fitted = {}
    for key, tensor in tensors.items():
        if key not in expected and "text_model." + key in expected:
            key = "text_model." + key
        elif key not in expected and key.startswith("text_model.") and key[len("text_model."):] in expected:
            key = key[len("text_model."):]
        if key.endswith("position_ids") and key not in expected:
            continue
        fitted[key] = tensor
    return fitted


def load_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], component: str, source: str):
    """load_state_dict with an error that names the first missing, unexpected or mis-shaped key."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = [(k, tuple(tensors[k].shape), tuple(own[k].shape)) for k in own if k in tensors
             and tensors[k].shape != own[k].shape]
    problem = None
    if missing:
        problem = f"{len(missing)} tensors are missing (first: {missing[0]!r})"
    elif unexpected:
        problem = f"{len(unexpected)} tensors are not part of it (first: {unexpected[0]!r})"
    elif wrong:
        key, got, want = wrong[0]
        problem = f"tensor {key!r} has shape {list(got)} where the architecture needs {list(want)}"
    if problem:
        raise ModelFileError(f"the {component} weights in {source} do not fit the {component} architecture: {problem}. "
                             "The file is damaged, incomplete, or not a Stable Diffusion 1.x/2.x model.")
    # assign: a module built on the meta device takes the file's tensors themselves
    module.load_state_dict(tensors, strict=True, assign=any(p.is_meta for p in module.parameters()))
    assert not any(b.is_meta for b in module.buffers()), f"{component}: a buffer was left on the meta device"
    return module


def pipeline_state(components) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(original-layout state dict, stablediff metadata) of a pipeline or a dict of its components."""
    parts = components.components if hasattr(components, "components") else dict(components)
    missing = [name for name in _COMPONENTS if parts.get(name) is None]
    if missing:
        raise ModelFileError(f"cannot write a single file without the pipeline's {', '.join(missing)}")
    unet, vae, text_model = parts["unet"], parts["vae"], parts["text_encoder"]
    layout = Layout(UNetLayout.from_config(unet.config), VAELayout.from_config(vae.config),
                    text_encoder_kind(type(text_model).__name__))
    state = diffusers_to_original(unet.state_dict(), vae.state_dict(), text_model.state_dict(), layout)
    metadata = {
        META + "format_version": "1",
        META + "unet_config": json.dumps(_plain_config(unet.config)),
        META + "vae_config": json.dumps(_plain_config(vae.config)),
        META + "scheduler": json.dumps({"class": type(parts["scheduler"]).__name__,
                                        "config": _plain_config(parts["scheduler"].config)}),
        **text_encoder_metadata(text_model, parts["tokenizer"]),
    }
    return state, metadata


def _plain_config(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def save_single_file(pipe_or_components, path: Path, metadata: dict | None = None) -> Path:
    """Write a pipeline (or {unet, vae, text_encoder, tokenizer, scheduler}) as one safetensors file."""
    state, meta = pipeline_state(pipe_or_components)
    extra = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return write_safetensors(state, {**meta, **extra}, Path(path))


def write_safetensors(state: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> Path:
    """Atomic, durable write (models/atomic_output.py): an interrupted export never leaves a torn file."""
    from safetensors.torch import save

    from stablediff.models.atomic_output import write_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return write_file(Path(path), save(tensors, metadata={"format": "pt", **portable_metadata(metadata)}))


# Keys of our JSON metadata that hold local absolute paths (transformers' `_name_or_path`, a run's
# directory): they leak usernames and folder layouts when files are shared, and no loader needs them.
_LOCAL_PATH_KEYS = ("_name_or_path", "name_or_path", "run_dir")


def portable_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """`metadata` with the local-path keys removed from the JSON values of our `stablediff.*` entries."""
    out = {}
    for key, value in metadata.items():
        if key.startswith(META):
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if parsed is not None and _without_paths(parsed) != parsed:  # rewrite only what held a path
                value = json.dumps(_without_paths(parsed))
        out[key] = value
    return out


def _without_paths(value):
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if k not in _LOCAL_PATH_KEYS}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    return value
