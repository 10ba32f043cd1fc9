"""kohya's rank dropout and module dropout (sd-scripts networks/lora.py) on peft's LoRA layers.

peft's LoRA layers have one dropout, `lora_dropout`, on the branch's input. kohya's
LoRA has two more, which users who come from sd-scripts set as network args:

- rank dropout p: each rank component of the branch (a channel of lora_A's output)
  is zeroed per sample with probability p and the kept ones scaled by 1/(1-p), as
  if the rank were smaller this step; the mask broadcasts over a LoCon's H, W.
- module dropout p: a layer's whole branch is skipped for one forward with
  probability p, without a rescale (as kohya does); its adapters get no gradient
  from that forward.

Both act only in training mode: validation, sampling, export and merging see the
adapters whole. They are forward hooks, installed after the adapters are attached
and never saved. The draws come from torch's global generators, which every
checkpoint saves and a resume restores (training/state.py), so a resumed run draws
what the uninterrupted one drew.
"""

from __future__ import annotations

from functools import partial

import torch

from stablediff.models.adapters import ADAPTER

# Keys of the LoRA config record (checkpoint meta `lora_config`) that are ours, not peft LoraConfig's.
DROPOUT_KEYS = ("rank_dropout", "module_dropout")
_SKIPPED = "_stablediff_branch_skipped"  # set on a layer while one forward runs without its branch


def peft_keys(config: dict) -> dict:
    """The LoRA config record without our dropout keys: what peft's LoraConfig (and diffusers) take."""
    return {key: value for key, value in config.items() if key not in DROPOUT_KEYS}


def dropout_settings(config: dict | None) -> dict[str, float]:
    """The record's rank/module dropout that are on (> 0); a record from before them has none."""
    return {key: float(config[key]) for key in DROPOUT_KEYS if config and config.get(key)}


def drop_ranks(hidden: torch.Tensor, p: float, rank_dim: int) -> torch.Tensor:
    """`hidden` (lora_A's output) with each sample's rank components zeroed with probability p, the rest * 1/(1-p).

    rank_dim: -1 for a Linear's (B, ..., r), 1 for a Conv2d's (B, r, H, W); the (B, r)
    mask broadcasts over the other dimensions."""
    batch, rank = hidden.shape[0], hidden.shape[rank_dim]
    keep = torch.rand((batch, rank), device=hidden.device) >= p  # kept with probability 1 - p
    shape = [1] * hidden.ndim
    shape[0], shape[rank_dim] = batch, rank
    return hidden * (keep.to(hidden.dtype) / (1.0 - p)).view(shape)


def _rank_dropout_hook(p: float, lora_a: torch.nn.Module, inputs, output: torch.Tensor):
    if not lora_a.training:
        return None
    return drop_ranks(output, p, 1 if isinstance(lora_a, torch.nn.Conv2d) else -1)


def _restore_branch_hook(layer: torch.nn.Module, inputs, output=None) -> None:
    if getattr(layer, _SKIPPED, False):
        layer._disable_adapters = False
        setattr(layer, _SKIPPED, False)


def _skip_branch_hook(p: float, layer: torch.nn.Module, inputs) -> None:
    # One draw per forward from the CPU generator (no device sync, like kohya's torch.rand(1)). peft's own
    # switch skips the branch; its enable_adapters() would also change requires_grad, so it is set directly
    # for this forward only and put back after it (or here, when that forward raised).
    _restore_branch_hook(layer, inputs)
    if layer.training and not layer.disable_adapters and float(torch.rand(())) < p:
        layer._disable_adapters = True
        setattr(layer, _SKIPPED, True)


def install_lora_dropout(model: torch.nn.Module, rank_dropout: float = 0.0, module_dropout: float = 0.0) -> int:
    """Rank and module dropout on every peft LoRA layer of `model` (p = 0: nothing installed).

    Returns how many layers got them."""
    from peft.tuners.lora import LoraLayer

    if not 0.0 <= rank_dropout < 1.0 or not 0.0 <= module_dropout < 1.0:
        raise ValueError(f"rank_dropout and module_dropout must be in [0, 1), got {rank_dropout}, {module_dropout}")
    if rank_dropout == 0.0 and module_dropout == 0.0:
        return 0
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]
    for layer in layers:
        if rank_dropout > 0.0:
            layer.lora_A[ADAPTER].register_forward_hook(partial(_rank_dropout_hook, rank_dropout))
        if module_dropout > 0.0:
            layer.register_forward_pre_hook(partial(_skip_branch_hook, module_dropout))
            layer.register_forward_hook(_restore_branch_hook)
    return len(layers)
