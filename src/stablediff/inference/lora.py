"""LoRA at inference: `--lora PATH[:SCALE]`, in diffusers/peft or kohya/A1111 format.

Loading is diffusers' `load_lora_weights` (it converts kohya keys such as
`lora_unet_..._attn1_to_q.lora_down.weight` with their `.alpha`), one peft
adapter per file, mixed with `set_adapters(names, adapter_weights=scales)`.
Before loading, every tensor is checked against this model's UNet, because
peft silently skips layers it cannot find: a LoRA made for another base model
would otherwise "load" and change nothing, or fail deep inside peft.

Only UNet LoRAs are supported with the default MiniLM (BERT) text encoder;
LoRAs that also train the text encoder target CLIP's layers and need a CLIP
text encoder.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stablediff.errors import GenerationError, MissingPathError, ModelFileError
from stablediff.inference.metadata import file_short_hash

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # what `save_lora_weights` writes in a folder
# A key that only a LoRA (or LoCon/LoHa/LoKr/DoRA) file has; a model's weights have none of them.
_LORA_TENSOR = re.compile(r"lora|\.alpha$|hada_|lokr_|dora_scale", re.IGNORECASE)


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float = 1.0

    @property
    def name(self) -> str:
        return self.path.parent.name if self.path.name == DIFFUSERS_LORA_FILE else self.path.stem


def parse_lora_arg(text: str, resolve: Callable[[Path], Path] | None = None) -> LoraSpec:
    """`PATH` or `PATH:SCALE`; the scale is split at the last colon only when it reads as a number.
    `resolve` maps the PATH first (the CLI turns a fine-tune's run directory into its LoRA file)."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail):
        path, scale = head, float(tail)
    elif sep and head and not Path(text).expanduser().exists() and Path(head).expanduser().exists():
        # `ink.safetensors:abc`: the file is there, so what is wrong is the scale, not the path.
        raise GenerationError(f"--lora {text}: the scale {tail!r} is not a number; give PATH:SCALE such as "
                              f"{head}:0.8, or PATH alone for scale 1")
    path = Path(path).expanduser()
    return LoraSpec(lora_file(resolve(path) if resolve is not None else path), scale)


def lora_file(path: Path) -> Path:
    """The safetensors file of a LoRA given as a file or as a folder written by `save_lora_weights`."""
    if path.is_dir() and (path / DIFFUSERS_LORA_FILE).is_file():
        path = path / DIFFUSERS_LORA_FILE
    if not path.is_file():
        raise MissingPathError(f"LoRA {path} does not exist; give a .safetensors LoRA file (or a folder holding "
                               f"{DIFFUSERS_LORA_FILE}) as --lora PATH[:SCALE]")
    if path.suffix.lower() != ".safetensors":
        raise ModelFileError(f"LoRA {path}: only .safetensors LoRA files are loaded (pickle-based .pt/.ckpt/.bin "
                             "files can run code); convert it to safetensors first")
    return path.resolve()


def read_lora(path: Path) -> dict:
    from safetensors.torch import load_file

    from stablediff.io.pickle_guard import sniff_format

    with open(path, "rb") as f:
        kind = sniff_format(f.read(16))
    if kind in ("zip", "pickle"):  # worded as the pickle guard words it for models
        raise ModelFileError(f"LoRA {path} is a pickle-based checkpoint ({kind} format) named .safetensors; loading "
                             "it can run arbitrary code hidden in the file, and pickle LoRAs are never loaded. Use a "
                             "real .safetensors version of it")
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise ModelFileError(f"LoRA {path} is not a readable safetensors file ({exc}); it may be truncated or "
                             "not a LoRA — download or export it again") from None


def check_lora_fits(pipe, state: dict, path: Path) -> None:
    """Raise ValueError unless every tensor of the LoRA names a layer of this UNet with matching shape."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    if not any(_LORA_TENSOR.search(key) for key in state):
        raise ModelFileError(f"{path} is not a LoRA: none of its {len(state)} tensors is a LoRA tensor (lora_down/"
                             f"lora_up, lora_A/lora_B, .alpha); its keys look like {next(iter(state), 'none')!r}. "
                             "--lora takes LoRA files; a whole model or UNet is given as MODEL")
    converted, _alphas = pipe.lora_state_dict(dict(state))  # a copy: kohya conversion pops keys
    unet_state = {k[len("unet."):]: v for k, v in converted.items() if k.startswith("unet.")}
    others = sorted({k.split(".")[0] for k in converted if not k.startswith("unet.")})
    if others and type(pipe.text_encoder).__name__ != "CLIPTextModel":
        raise ModelFileError(f"LoRA {path} also changes the {', '.join(others)}; such LoRAs target CLIP's layers and "
                             f"this model's text encoder is {type(pipe.text_encoder).__name__}. Use a UNet-only LoRA")
    if not unet_state:
        raise ModelFileError(f"LoRA {path} holds no UNet LoRA tensors (keys like {next(iter(state), 'none')!r}); "
                             "give a diffusers/peft or kohya LoRA for a Stable Diffusion UNet")
    problems = []
    for key, tensor in convert_unet_state_dict_to_peft(unet_state).items():
        problem = _tensor_problem(pipe.unet, key, tuple(tensor.shape))
        if problem:
            problems.append(problem)
    if problems:
        raise ModelFileError(f"LoRA {path} does not fit this model ({len(problems)} tensors), e.g. "
                             f"{'; '.join(problems[:3])}. It was probably made for another base model; "
                             "use a LoRA trained on this one")


def _tensor_problem(unet, key: str, shape: tuple[int, ...]) -> str | None:
    match = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.\w+)?\.weight|(.+)\.(alpha|lora_magnitude_vector)", key)
    if not match:
        return f"{key} is not a LoRA tensor name"
    module_name = match[1] or match[3]
    try:
        layer = unet.get_submodule(module_name)
    except AttributeError:
        return f"no layer {module_name}"
    weight = getattr(layer, "weight", None)
    if match[2] and weight is not None:
        expected = weight.shape[1] if match[2] == "lora_A" else weight.shape[0]
        got = shape[1] if match[2] == "lora_A" else shape[0]
        if len(shape) < 2 or got != expected:
            return f"{key} has shape {shape}, layer {module_name} has weight {tuple(weight.shape)}"
    return None


def adapter_name(path: Path) -> str:
    # The content hash: the same file is loaded once, and a file changed on disk becomes a new adapter.
    return f"lora_{file_short_hash(path)}"


def apply_loras(pipe, specs: list[LoraSpec]) -> None:
    """Make exactly `specs` active at their scales; adapters not asked for are removed."""
    wanted = {adapter_name(spec.path): spec for spec in specs}
    loaded = set(pipe.get_list_adapters().get("unet", [])) if hasattr(pipe.unet, "peft_config") else set()
    if not wanted:
        if loaded:
            pipe.unload_lora_weights()
        return
    if loaded - wanted.keys():
        pipe.delete_adapters(sorted(loaded - wanted.keys()))
    for name, spec in wanted.items():
        if name not in loaded:
            _load_one(pipe, spec.path, name)
    pipe.set_adapters(list(wanted), adapter_weights=[spec.scale for spec in wanted.values()])


def _load_one(pipe, path: Path, name: str) -> None:
    from stablediff.models.quiet import quiet_hf_libraries

    state = read_lora(path)
    check_lora_fits(pipe, state, path)
    # quiet: "no text-encoder keys" and peft's per-adapter key notes, for this load only
    with quiet_hf_libraries(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft: "multiple adapters" is exactly what we want
        pipe.load_lora_weights(state, adapter_name=name)
