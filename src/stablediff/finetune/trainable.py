"""What trains in a fine-tune: the method (full or LoRA), then the freeze patterns."""

from __future__ import annotations

import torch

from stablediff.config.finetune import FinetuneConfig
from stablediff.finetune.freeze import apply_freeze
from stablediff.finetune.lora import add_lora


def make_trainable(unet: torch.nn.Module, cfg: FinetuneConfig, seed: int) -> dict | None:
    """Set requires_grad for the method and patterns; the LoRA config (for the checkpoint) or None."""
    lora = None
    if cfg.method == "textual_inversion":  # only the new token's vectors train (finetune/live_captions.py)
        unet.requires_grad_(False)
        return None
    if cfg.method == "lora":
        lora = add_lora(unet, cfg.lora, seed)  # freezes the base, adapters train
    else:
        unet.requires_grad_(True)
    apply_freeze(unet, cfg.freeze, cfg.train_only)
    return lora
