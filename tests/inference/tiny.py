"""A tiny Stable Diffusion pipeline with our MiniLM text encoder, and LoRA files for it.

Random weights at the smallest sizes diffusers allows: the tests judge how
images are made (seeds, samplers, masks, LoRA scales, metadata), not how good
they look.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_SIZE = 16  # pixels; latents are 8x8


def build_tiny_pipeline_folder(folder: Path) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from stablediff.models.pipeline_assembly import assemble_pipeline
    from stablediff.models.text_encoder import load_text_encoder

    torch.manual_seed(0)
    text_encoder = load_text_encoder("minilm", max_length=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=TINY_SIZE)
    with torch.no_grad():  # a sharp posterior, as a trained VAE's is: img2img's encoding is then deterministic
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -20.0  # log-variance of the 4 latent channels
    unet = UNet2DConditionModel(sample_size=TINY_SIZE // 2, in_channels=4, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(16, 32),
                                layers_per_block=1, cross_attention_dim=text_encoder.hidden_size,
                                attention_head_dim=4, norm_num_groups=8)
    noise = DDPMScheduler(beta_schedule="linear", prediction_type="epsilon", clip_sample=False, steps_offset=1)
    pipe = assemble_pipeline(vae, text_encoder.model, text_encoder.tokenizer, unet, dict(noise.config))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def write_peft_lora(model_folder: Path, out_folder: Path, seed: int = 1) -> Path:
    """A rank-4 LoRA on every attention projection, saved the way diffusers' training scripts do."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model_folder / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peft starts lora_B at zero (a no-op); give it weight so the LoRA shows
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out_folder, unet_lora_layers=layers, safe_serialization=True)
    return out_folder / "pytorch_lora_weights.safetensors"


def kohya_lora_tensors(model_folder: Path, seed: int = 2, rank: int = 4) -> dict[str, torch.Tensor]:
    """kohya/A1111 key names: lora_unet_<module path with _>.lora_down.weight / .lora_up.weight / .alpha."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_folder / "unet")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.3
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.3
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    return tensors
