"""The layers a LoRA file can land on: a base model's Linear/Conv2d modules, in each naming a loader uses.

`lora check` matches a file's keys against these. Without a base model they are
SD 1.5's (its UNet config and CLIP ViT-L/14, built on the "meta" device: module
names and weight shapes, no weights, no download); with one, that model's, read
from a diffusers folder's configs or from a single file's tensor shapes.

Each UNet module is known by its diffusers path (`down_blocks.0.attentions.0.
proj_in`) and its original-SD (ldm) path (`input_blocks.1.1.proj_in`), which is
what A1111 and ComfyUI name the model's layers by (models/keymap.py maps the
two). Text encoder modules carry the `text_model.` level that every LoRA file
names them with, whether or not this transformers version has it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stablediff.errors import ModelFileError

SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
SD15_CLIP = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "projection_dim": 768}


@dataclass
class LoraTargets:
    """Weight shapes of the LoRA-able layers, by diffusers module path; `ldm`: diffusers -> original path."""
    name: str
    unet: dict[str, tuple[int, ...]] = field(default_factory=dict)
    ldm: dict[str, str] = field(default_factory=dict)
    text_encoder: dict[str, tuple[int, ...]] = field(default_factory=dict)  # "text_model.encoder.layers.0..."
    text_encoder_kind: str = "clip"
    layers_per_block: int = 2


def _weight_shapes(model: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + name: tuple(module.weight.shape) for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}


def _ldm_names(modules: dict[str, tuple[int, ...]], unet_config: dict) -> dict[str, str]:
    from stablediff.models.keymap import UNetLayout, unet_pairs

    pairs = unet_pairs(UNetLayout.from_config(unet_config))
    out = {}
    for module in modules:
        dotted = module + "."
        match = max((p for p in pairs if dotted.startswith(p)), key=len, default=None)
        if match is not None:
            out[module] = (pairs[match] + dotted[len(match):]).rstrip(".")
    return out


def targets_from_configs(name: str, unet_config: dict, clip_config: dict | None) -> LoraTargets:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):  # shapes only: SD 1.5 would otherwise be 1 GB of random weights
        unet = UNet2DConditionModel(**{k: v for k, v in unet_config.items() if not k.startswith("_")})
        text = CLIPTextModel(CLIPTextConfig(**clip_config)) if clip_config else None
    modules = _weight_shapes(unet)
    text_modules = {}
    if text is not None:
        prefix = "" if hasattr(text, "text_model") else "text_model."
        text_modules = _weight_shapes(text, prefix)
    return LoraTargets(name, modules, _ldm_names(modules, dict(unet.config)), text_modules,
                       "clip" if text is not None else "other", int(unet.config.layers_per_block))


def sd15_targets() -> LoraTargets:
    return targets_from_configs("the SD 1.5 architecture", SD15_UNET, SD15_CLIP)


def _folder_configs(folder: Path) -> tuple[dict, dict | None]:
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        text = json.loads((folder / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"--base {folder}: cannot read its unet/ and text_encoder/ config.json ({exc}); give a "
                             "diffusers pipeline folder or an SD single file") from None
    if "CLIPTextModel" not in (text.get("architectures") or []):
        return unet, None
    keys = set(SD15_CLIP) | {"layer_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id"}
    return unet, {k: v for k, v in text.items() if k in keys}


def _single_file_configs(path: Path) -> tuple[dict, dict | None]:
    from stablediff.models import architecture
    from stablediff.models.state_dict_file import header_shapes, read_header

    header, metadata = read_header(path)
    shapes = header_shapes(header)
    architecture.require_components(shapes, str(path))
    unet, _vae = architecture.model_configs(metadata, shapes)
    clip = architecture.infer_clip_config(shapes) if architecture.text_encoder_kind(shapes) == "clip" else None
    return unet, clip


def base_targets(base: Path) -> LoraTargets:
    """The LoRA-able layers of a diffusers folder or an SD 1.x `.safetensors` single file."""
    from stablediff.models.model_tools import is_diffusers_folder

    base = Path(base)
    if is_diffusers_folder(base):
        unet, clip = _folder_configs(base)
    elif base.is_file() and base.suffix.lower() == ".safetensors":
        unet, clip = _single_file_configs(base)
    else:
        raise ModelFileError(f"--base {base} is neither a diffusers pipeline folder (with model_index.json) nor a "
                             ".safetensors single file; give the model the LoRA is meant for")
    return targets_from_configs(str(base), unet, clip)
