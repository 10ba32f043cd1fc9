"""The smallest real diffusers models the unit tests train and evaluate."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel


def tiny_unet(seed: int = 0, channels: int = 4, widths: tuple[int, int] = (16, 32),
              groups: int = 8) -> UNet2DConditionModel:
    """A cross-attention UNet on (B, channels, 8, 8) latents with 32-wide text embeddings."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=widths, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=groups)


# A fixed batch for the objective and schedule tests: latents, text states, noise, four timesteps.
SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction", "sample")


def fixed_batch(seed: int = 0, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    latents, text = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 3, 32, generator=g)
    noise = torch.randn(batch, 4, 8, 8, generator=g)
    return latents, text, noise, torch.tensor([50, 300, 600, 900][:batch])
