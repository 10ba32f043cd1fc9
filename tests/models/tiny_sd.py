"""Tiny real SD-architecture pipelines for the model-file tests (built in a second on a CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from stablediff.models.pipeline_assembly import assemble_pipeline
from stablediff.models.text_encoder import load_text_encoder

SD_DDPM = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
           "prediction_type": "epsilon", "clip_sample": False, "steps_offset": 1}


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4,
                        sample_size=16, scaling_factor=0.5)
    return _randomise(vae, seed)


def tiny_unet(cross_attention_dim: int = 384, seed: int = 0, in_channels: int = 4,
              layers: int = 1) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(16, 32), layers_per_block=layers,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8)
    return _randomise(unet, seed)


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Zero-initialised output layers would hide a mapping that swaps them: give every tensor noise."""
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return module.eval()


def tiny_pipeline(seed: int = 0):
    """Our layout: MiniLM (BERT, 384 wide) text encoder, tiny VAE and UNet, DPM-Solver++."""
    encoder = load_text_encoder("minilm", max_length=8)
    return assemble_pipeline(tiny_vae(seed), encoder.model, encoder.tokenizer, tiny_unet(384, seed), SD_DDPM)


def tiny_clip_tokenizer_folder(folder: Path) -> Path:
    """A CLIP BPE tokenizer with a character vocabulary (no merges): enough to run a pipeline."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {"model_max_length": 8, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tiny_clip_pipeline(tokenizer_folder: Path, seed: int = 0):
    """SD 1.x shape: a (tiny) CLIPTextModel whose keys use the `cond_stage_model.transformer` layout."""
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_tokenizer_folder(tokenizer_folder), local_files_only=True)
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=1, max_position_embeddings=8, hidden_act="quick_gelu",
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    text_encoder = _randomise(CLIPTextModel(config), seed)
    return assemble_pipeline(tiny_vae(seed), text_encoder, tokenizer, tiny_unet(64, seed), SD_DDPM)


def image(pipe, prompt: str = "a digit seven", seed: int = 0):
    """One 16x16 image as a float array, 2 sampling steps."""
    from stablediff.inference.pipeline import images_to_array, txt2img

    return images_to_array(txt2img(pipe, prompt, steps=2, seed=seed, size=(16, 16))).astype("float32")


def state_dicts(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {name: getattr(pipe, name).state_dict() for name in ("unet", "vae", "text_encoder")}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
