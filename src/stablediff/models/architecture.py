"""Infer diffusers configs from the tensor shapes of an original-layout (single-file) state dict.

Files written by other tools carry no config, so the architecture is read off
the weights: channels, layers per block, which blocks have attention, the
cross-attention width, latent channels, 4 or 9 input channels (inpainting).
Some facts are not in any shape, and for those we take Stable Diffusion's
values: GroupNorm groups (32), attention heads (8 for a 768-wide context as in
SD 1.x, 64 channels per head otherwise as in SD 2.x), the VAE scaling factor
(0.18215) and the sample size. Our own exports store their exact configs in
the file's metadata instead (see single_file_pipeline.py).
"""

from __future__ import annotations

import json
import math
import re

from stablediff.errors import ModelFileError
from stablediff.models.keymap import (CLIP_PREFIX, LEGACY_CLIP_PREFIX, OPEN_CLIP_PREFIX, TEXT_PREFIX, UNET_PREFIX,
                                      VAE_PREFIX, UNetLayout, VAELayout)

Shapes = dict[str, tuple[int, ...]]
SD_NORM_GROUPS = 32
SD_VAE_SCALING = 0.18215


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in shapes if (m := regex.match(key))})


def _shape(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ModelFileError(f"tensor {key!r} is missing, so the {what} cannot be inferred; the file is not a "
                             "complete Stable Diffusion 1.x/2.x model (truncated or from another architecture)")
    return shapes[key]


def require_components(shapes: Shapes, source: str) -> None:
    """Raise naming the first missing component: UNet, VAE or text encoder."""
    for prefix, name in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE"), (TEXT_PREFIX, "text encoder")):
        if not any(key.startswith(prefix) for key in shapes):
            found = sorted({key.split(".")[0] for key in shapes})[:6]
            raise ModelFileError(f"{source} has no {name} weights (no '{prefix}*' tensors; top-level names found: "
                                 f"{found}). Give a complete Stable Diffusion 1.x/2.x checkpoint with UNet, VAE and "
                                 "text encoder.")


def text_encoder_kind(shapes: Shapes) -> str:
    """'clip' (SD 1.x), 'open_clip' (SD 2.x), 'bert' (our MiniLM export) or 'hf' (other transformers keys)."""
    keys = [k for k in shapes if k.startswith(TEXT_PREFIX)]
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
        return "open_clip"
    if any(k.startswith(LEGACY_CLIP_PREFIX) for k in keys):
        return "clip"
    if TEXT_PREFIX + "embeddings.word_embeddings.weight" in shapes:
        return "bert"
    return "hf"


def unet_layout(shapes: Shapes) -> UNetLayout:
    p = UNET_PREFIX
    inputs = _indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.")
    downsamplers = _indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.")
    n = len(downsamplers) + 1
    if not inputs or len(inputs) % n:
        raise ModelFileError(f"the UNet's input_blocks ({len(inputs)}) do not form {n} equal levels; "
                             "this is not a Stable Diffusion 1.x/2.x UNet")
    per = len(inputs) // n - 1
    down = tuple(f"{p}input_blocks.{1 + b * (per + 1)}.1.proj_in.weight" in shapes for b in range(n))
    up = tuple(f"{p}output_blocks.{b * (per + 1)}.1.proj_in.weight" in shapes for b in range(n))
    return UNetLayout(per, down, up)


def vae_layout(shapes: Shapes) -> VAELayout:
    levels = _indices(shapes, re.escape(VAE_PREFIX) + r"encoder\.down\.(\d+)\.")
    per = _indices(shapes, re.escape(VAE_PREFIX) + r"encoder\.down\.0\.block\.(\d+)\.")
    if not levels or not per:
        raise ModelFileError("the VAE has no encoder.down.N.block.M tensors; this is not an SD 1.x/2.x autoencoder")
    return VAELayout(len(levels), len(per))


def _heads(cross_attention_dim: int, channels: list[int]) -> int | list[int]:
    """diffusers' `attention_head_dim` (really the number of heads): SD 1.x uses 8, SD 2.x 64-wide heads."""
    if cross_attention_dim == 768:
        return 8
    if all(c % 64 == 0 for c in channels):
        return [c // 64 for c in channels]
    return 8 if all(c % 8 == 0 for c in channels) else 1


def _norm_groups(channels: list[int]) -> int:
    """32 as in SD; tiny models whose widths 32 does not divide get the largest power of two that does."""
    common = math.gcd(*channels)
    return SD_NORM_GROUPS if common % SD_NORM_GROUPS == 0 else common & -common


def infer_unet_config(shapes: Shapes) -> dict:
    lay, p = unet_layout(shapes), UNET_PREFIX
    per, n = lay.layers_per_block, len(lay.down_attention)
    channels = [_shape(shapes, f"{p}input_blocks.{1 + b * (per + 1)}.0.out_layers.3.weight", "UNet width")[0]
                for b in range(n)]
    attention = next((k for k in shapes if k.startswith(p) and k.endswith("attn2.to_k.weight")), None)
    cross = shapes[attention][1] if attention else 768
    proj_in = next((shapes[k] for k in shapes if k.startswith(p) and k.endswith(".proj_in.weight")), None)
    transformer_layers = [len(_indices(shapes, re.escape(f"{p}input_blocks.{1 + b * (per + 1)}.1.")
                                       + r"transformer_blocks\.(\d+)\.")) or 1 for b in range(n)]
    return {
        "sample_size": 64,
        "in_channels": _shape(shapes, p + "input_blocks.0.0.weight", "UNet input")[1],
        "out_channels": _shape(shapes, p + "out.2.weight", "UNet output")[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in lay.down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in lay.up_attention],
        "block_out_channels": channels,
        "layers_per_block": per,
        "cross_attention_dim": cross,
        "attention_head_dim": _heads(cross, channels),
        "use_linear_projection": bool(proj_in and len(proj_in) == 2),
        "transformer_layers_per_block": transformer_layers[0] if len(set(transformer_layers)) == 1
        else transformer_layers,
        "norm_num_groups": _norm_groups(channels),
    }


def infer_vae_config(shapes: Shapes) -> dict:
    lay, p = vae_layout(shapes), VAE_PREFIX
    channels = [_shape(shapes, f"{p}encoder.down.{b}.block.0.conv1.weight", "VAE width")[0]
                for b in range(lay.num_blocks)]
    return {
        "in_channels": _shape(shapes, p + "encoder.conv_in.weight", "VAE input")[1],
        "out_channels": _shape(shapes, p + "decoder.conv_out.weight", "VAE output")[0],
        "down_block_types": ["DownEncoderBlock2D"] * lay.num_blocks,
        "up_block_types": ["UpDecoderBlock2D"] * lay.num_blocks,
        "block_out_channels": channels,
        "layers_per_block": lay.layers_per_block,
        "latent_channels": _shape(shapes, p + "post_quant_conv.weight", "latent channels")[0],
        "norm_num_groups": _norm_groups(channels),
        "sample_size": 512,
        "scaling_factor": SD_VAE_SCALING,
    }


def infer_clip_config(shapes: Shapes) -> dict:
    """CLIPTextConfig arguments for an SD 1.x text encoder (OpenAI CLIP ViT-L/14: quick_gelu, 64-wide heads)."""
    p = CLIP_PREFIX if any(k.startswith(CLIP_PREFIX) for k in shapes) else LEGACY_CLIP_PREFIX
    vocab, hidden = _shape(shapes, p + "embeddings.token_embedding.weight", "CLIP width")
    layers = _indices(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\.")
    return {
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": len(layers),
        "intermediate_size": _shape(shapes, p + "encoder.layers.0.mlp.fc1.weight", "CLIP MLP")[0],
        "num_attention_heads": max(hidden // 64, 1),
        "max_position_embeddings": _shape(shapes, p + "embeddings.position_embedding.weight", "CLIP positions")[0],
        "hidden_act": "quick_gelu", "projection_dim": hidden,
    }


def model_configs(metadata: dict[str, str], shapes: Shapes) -> tuple[dict, dict]:
    """(unet, vae) diffusers configs: ours from the metadata, anything else inferred from the shapes."""
    from stablediff.models.state_dict_file import META

    if META + "unet_config" in metadata and META + "vae_config" in metadata:
        return json.loads(metadata[META + "unet_config"]), json.loads(metadata[META + "vae_config"])
    return infer_unet_config(shapes), infer_vae_config(shapes)


def describe(unet_config: dict, text_kind: str) -> str:
    """A short name for the architecture: 'SD 1.x', 'SD 2.x', with '(inpainting)' for 9 input channels."""
    cross = unet_config["cross_attention_dim"]
    if text_kind == "clip" and cross == 768:
        name = "SD 1.x"
    elif text_kind == "open_clip" or cross == 1024:
        name = "SD 2.x"
    else:
        name = f"SD-architecture (custom: {text_kind} text encoder, context width {cross})"
    return name + (" inpainting" if unet_config["in_channels"] == 9 else "")
