"""The one key mapping between diffusers' layout and the original single-file SD layout.

An SD 1.x/2.x single file (CompVis/ldm, A1111, ComfyUI, Civitai) holds one flat
state dict with three prefixes:

    model.diffusion_model.*   the UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*       the VAE (encoder.down.N.block.M, decoder.up.N reversed)
    cond_stage_model.*        the text encoder

diffusers splits the same tensors into `unet`, `vae` and `text_encoder` state
dicts with other names. Both directions are built from one table of prefix
pairs, derived from the architecture (`Layout`): blocks, layers per block and
which blocks have attention. Tensors are never changed except the VAE mid-block
attention projections, 1x1 convolutions (C, C, 1, 1) in the original layout and
linear layers (C, C) in diffusers.

Text encoders:
  * CLIP (SD 1.x): `cond_stage_model.transformer.text_model.<key>` <-> transformers'
    CLIPTextModel `<key>` (older files without `text_model.` are read too).
  * anything else, such as our MiniLM (BERT): transformers' own key names under
    `cond_stage_model.` (`cond_stage_model.encoder.layer.0...`). The original
    SD code has no BERT layout to follow, so we keep the names transformers uses.
  * SD 2.x OpenCLIP (`cond_stage_model.model.*`) is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stablediff.errors import ModelFileError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
CLIP_PREFIX = TEXT_PREFIX + "transformer.text_model."
LEGACY_CLIP_PREFIX = TEXT_PREFIX + "transformer."
OPEN_CLIP_PREFIX = TEXT_PREFIX + "model."

# ResNet sub-layers: diffusers name -> original name.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_CONV_ATTENTION = ("q.weight", "k.weight", "v.weight", "proj_out.weight")


@dataclass(frozen=True)
class UNetLayout:
    layers_per_block: int
    down_attention: tuple[bool, ...]  # per down block, highest resolution first
    up_attention: tuple[bool, ...]  # per up block, lowest resolution first (diffusers' order)

    @classmethod
    def from_config(cls, config) -> UNetLayout:
        layers = config["layers_per_block"]
        if not isinstance(layers, int):
            raise ModelFileError(f"UNet layers_per_block {layers!r} differs per block; the SD single-file "
                                 "layout needs one number for all blocks")
        return cls(layers, tuple("CrossAttn" in t for t in config["down_block_types"]),
                   tuple("CrossAttn" in t for t in config["up_block_types"]))


@dataclass(frozen=True)
class VAELayout:
    num_blocks: int
    layers_per_block: int

    @classmethod
    def from_config(cls, config) -> VAELayout:
        return cls(len(config["block_out_channels"]), int(config["layers_per_block"]))


@dataclass(frozen=True)
class Layout:
    unet: UNetLayout
    vae: VAELayout
    text_encoder: str  # "clip" (SD 1.x names) or "hf" (transformers' names under cond_stage_model.)


def text_encoder_kind(model_class_name: str) -> str:
    return "clip" if model_class_name == "CLIPTextModel" else "hf"


def _resnet(pairs: dict[str, str], diffusers: str, original: str, names: dict[str, str]) -> None:
    for d, o in names.items():
        pairs[f"{diffusers}.{d}."] = f"{original}.{o}."


def unet_pairs(layout: UNetLayout) -> dict[str, str]:
    """diffusers module prefix -> original module prefix, for every UNet module."""
    pairs = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
             "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    n, per = len(layout.down_attention), layout.layers_per_block
    for b in range(n):
        for j in range(per):
            index = 1 + b * (per + 1) + j  # input_blocks.0 is conv_in; each block ends with its downsampler
            _resnet(pairs, f"down_blocks.{b}.resnets.{j}", f"input_blocks.{index}.0", _UNET_RESNET)
            if layout.down_attention[b]:
                pairs[f"down_blocks.{b}.attentions.{j}."] = f"input_blocks.{index}.1."
        if b < n - 1:
            pairs[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{1 + b * (per + 1) + per}.0.op."
    _resnet(pairs, "mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
    pairs["mid_block.attentions.0."] = "middle_block.1."
    _resnet(pairs, "mid_block.resnets.1", "middle_block.2", _UNET_RESNET)
    for b in range(n):
        for j in range(per + 1):  # up blocks have one more layer (the skip from the downsampler)
            index = b * (per + 1) + j
            _resnet(pairs, f"up_blocks.{b}.resnets.{j}", f"output_blocks.{index}.0", _UNET_RESNET)
            if layout.up_attention[b]:
                pairs[f"up_blocks.{b}.attentions.{j}."] = f"output_blocks.{index}.1."
        if b < n - 1:
            slot = 2 if layout.up_attention[b] else 1
            pairs[f"up_blocks.{b}.upsamplers.0.conv."] = f"output_blocks.{b * (per + 1) + per}.{slot}.conv."
    return pairs


def _vae_mid(pairs: dict[str, str], side: str) -> None:
    _resnet(pairs, f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", _VAE_RESNET)
    _resnet(pairs, f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", _VAE_RESNET)
    for d, o in _VAE_ATTENTION.items():
        pairs[f"{side}.mid_block.attentions.0.{d}."] = f"{side}.mid.attn_1.{o}."


def vae_pairs(layout: VAELayout) -> dict[str, str]:
    """diffusers module prefix -> original module prefix, for every VAE module."""
    pairs = {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    n, per = layout.num_blocks, layout.layers_per_block
    for side in ("encoder", "decoder"):
        pairs[f"{side}.conv_in."] = f"{side}.conv_in."
        pairs[f"{side}.conv_out."] = f"{side}.conv_out."
        pairs[f"{side}.conv_norm_out."] = f"{side}.norm_out."
        _vae_mid(pairs, side)
    for b in range(n):
        for j in range(per):
            _resnet(pairs, f"encoder.down_blocks.{b}.resnets.{j}", f"encoder.down.{b}.block.{j}", _VAE_RESNET)
        if b < n - 1:
            pairs[f"encoder.down_blocks.{b}.downsamplers.0.conv."] = f"encoder.down.{b}.downsample.conv."
        up = n - 1 - b  # the original decoder numbers its levels from the highest resolution
        for j in range(per + 1):
            _resnet(pairs, f"decoder.up_blocks.{b}.resnets.{j}", f"decoder.up.{up}.block.{j}", _VAE_RESNET)
        if b < n - 1:
            pairs[f"decoder.up_blocks.{b}.upsamplers.0.conv."] = f"decoder.up.{up}.upsample.conv."
    return pairs


def _rename(key: str, pairs: dict[str, str], component: str) -> str:
    """Replace the longest mapped module prefix of `key`; the parameter name after it is kept."""
    cut = len(key)
    while (cut := key.rfind(".", 0, cut)) > 0:
        prefix = key[: cut + 1]
        if prefix in pairs:
            return pairs[prefix] + key[cut + 1 :]
    raise ModelFileError(f"{component} key {key!r} has no place in the SD 1.x/2.x layout; the model is not a "
                         "Stable Diffusion 1.x/2.x architecture (or its config does not match its weights)")


def _is_vae_conv_attention(original_key: str) -> bool:
    return ".mid.attn_1." in original_key and original_key.endswith(_VAE_CONV_ATTENTION)


def diffusers_to_original(unet: dict[str, torch.Tensor], vae: dict[str, torch.Tensor],
                          text_encoder: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """The three diffusers state dicts as one flat state dict in the original SD layout."""
    out: dict[str, torch.Tensor] = {}
    u_pairs, v_pairs = unet_pairs(layout.unet), vae_pairs(layout.vae)
    for key, tensor in unet.items():
        out[UNET_PREFIX + _rename(key, u_pairs, "UNet")] = tensor
    for key, tensor in vae.items():
        name = _rename(key, v_pairs, "VAE")
        if _is_vae_conv_attention(name) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[VAE_PREFIX + name] = tensor
    text_prefix = CLIP_PREFIX if layout.text_encoder == "clip" else TEXT_PREFIX
    for key, tensor in text_encoder.items():
        if layout.text_encoder == "clip" and key.startswith("text_model."):  # transformers < 5.6 nesting
            key = key[len("text_model.") :]
        out[text_prefix + key] = tensor
    return out


def original_to_diffusers(state: dict[str, torch.Tensor], layout: Layout) -> dict[str, dict[str, torch.Tensor]]:
    """{"unet", "vae", "text_encoder", "other"} state dicts from a flat original-layout state dict.

    "other" holds what belongs to no component (EMA copies, noise-schedule buffers);
    callers decide whether that matters.
    """
    u_pairs = {o: d for d, o in unet_pairs(layout.unet).items()}
    v_pairs = {o: d for d, o in vae_pairs(layout.vae).items()}
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "text_encoder": {}, "other": {}}
    for key, tensor in state.items():
        if key.startswith(UNET_PREFIX):
            parts["unet"][_rename(key[len(UNET_PREFIX) :], u_pairs, "UNet")] = tensor
        elif key.startswith(VAE_PREFIX):
            name = key[len(VAE_PREFIX) :]
            if _is_vae_conv_attention(name) and tensor.ndim == 4:
                tensor = tensor[:, :, 0, 0]
            parts["vae"][_rename(name, v_pairs, "VAE")] = tensor
        elif key.startswith(TEXT_PREFIX):
            parts["text_encoder"][_text_key(key, layout.text_encoder)] = tensor
        else:
            parts["other"][key] = tensor
    return parts


def _text_key(key: str, kind: str) -> str:
    if kind == "hf":
        return key[len(TEXT_PREFIX) :]
    if key.startswith(OPEN_CLIP_PREFIX):
        raise ModelFileError(f"{key!r} is an SD 2.x OpenCLIP text encoder key; SD 2.x single files are not "
                             "supported yet. Convert the file with diffusers' scripts to a diffusers folder and "
                             "use that folder instead.")
    for prefix in (CLIP_PREFIX, LEGACY_CLIP_PREFIX):
        if key.startswith(prefix):
            return key[len(prefix) :]
    raise ModelFileError(f"text encoder key {key!r} is not in the SD 1.x CLIP layout "
                         f"({CLIP_PREFIX}*); the file mixes text encoder layouts")
