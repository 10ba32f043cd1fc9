"""A tiny SD 1.x-shaped pipeline (CLIP text encoder, SD's block order) and LoRA checkpoints of it.

The UNet keeps SD 1.5's layout at toy widths: two layers per block, attention in
the first down block and the last up block, none in up block 0, so the module
paths (and A1111's hard-coded SD index arithmetic) are those of SD 1.5.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.models.tiny_sd import SD_DDPM, _randomise, tiny_clip_tokenizer_folder, tiny_vae

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
LOCON = ATTENTION + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "time_emb_proj"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def sd_shaped_unet(cross_attention_dim: int = 64, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8)
    return _randomise(unet, seed)


def build_sd_shaped_folder(folder: Path) -> Path:
    """A diffusers pipeline folder: tiny VAE, tiny CLIP (2 layers, 64 wide), SD-shaped UNet."""
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    from stablediff.models.pipeline_assembly import assemble_pipeline

    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_tokenizer_folder(folder.parent / "tokenizer-src"),
                                              local_files_only=True)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=1, max_position_embeddings=8, hidden_act="quick_gelu",
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    text_encoder = _randomise(CLIPTextModel(config), 0)
    pipe = assemble_pipeline(tiny_vae(0), text_encoder, tokenizer, sd_shaped_unet(64, 0), SD_DDPM)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def add_trained_lora(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, seed: int,
                     use_dora: bool = False) -> torch.nn.Module:
    """peft adapters on `model` with random non-zero lora_B (peft starts it at zero: a no-op)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_dora=use_dora)
    if hasattr(model, "set_adapters"):  # a diffusers model: as the fine-tune run adds them
        model.add_adapter(config)
    else:  # transformers' add_adapter wants a newer peft; this is what it calls (adapter name "default")
        inject_adapter_in_model(config, model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def lora_checkpoint(run_dir: Path, groups: dict[str, torch.nn.Module], meta: dict, step: int = 7) -> Path:
    """A run directory whose checkpoint holds each module's adapter tensors under its group (unet/, ...)."""
    from stablediff.checkpoint import CheckpointStore

    tensors = {f"{group}/{name}": t.detach().clone() for group, model in groups.items()
               for name, t in model.state_dict().items() if "lora_" in name}
    CheckpointStore(run_dir / "checkpoints").save(step, tensors, {"stage": "unet", "step": step, **meta})
    return run_dir


def lora_config_meta(rank: int, alpha: float, targets: list[str], use_dora: bool = False) -> dict:
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(targets), "use_dora": use_dora}


def image(pipe, seed: int = 3):
    """One 16x16 image (uint8 array), 2 steps: the same prompt and seed for every comparison."""
    import numpy as np

    from stablediff.inference.pipeline import images_to_array, txt2img

    with torch.no_grad():
        return np.asarray(images_to_array(txt2img(pipe, "a digit seven", steps=2, seed=seed, size=(16, 16))),
                          dtype=np.int16)
