"""Optimizers users expect (`train.optimizer`) over parameter groups with and without weight decay.

`make_optimizer([(unet, None), (text_encoder, 5e-5)], cfg)` gives each module its
own learning rate (None: `train.learning_rate`) and two parameter groups: the
weights that decay and, unless `train.decay_norms_and_biases`, those that do not
(biases, normalisation weights, embeddings). Only parameters with requires_grad
go in, each once, in module order: the checkpoint keys optimizer state by
parameter index, so the order must be the same in every process that resumes it.

Every optimizer's full state round-trips through a checkpoint (training/state.py)
and a resumed run is bitwise equal to an uninterrupted one on a CPU.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from stablediff.config.schema import TrainConfig
from stablediff.errors import ConfigError

ModuleLRs = Sequence[tuple[nn.Module, float | None]]  # (module, its learning rate or None for train.learning_rate)

# Norm layers of torch and of the libraries whose models we train (diffusers' RMSNorm and
# AdaGroupNorm, transformers' T5LayerNorm, ...) all end their class name so.
_NORM_CLASS = re.compile(r"Norm(\d+d)?$")
# peft's DoRA magnitude vector is a per-output-channel scale, like a norm weight: decaying it
# shrinks the whole adapted layer.
_DORA_MAGNITUDE = "lora_magnitude_vector"


def make_optimizer(groups: ModuleLRs, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The `train.optimizer` over the trainable parameters of `groups` (see `parameter_groups`)."""
    return _BUILDERS[cfg.optimizer](parameter_groups(groups, cfg), cfg)


def parameter_groups(groups: ModuleLRs, cfg: TrainConfig) -> list[dict]:
    """Per module, in order: {"params", "lr", "weight_decay"} for its decayed weights, then for the
    rest (weight_decay 0); a group with no parameters is left out."""
    seen: set[int] = set()  # a parameter shared by two modules trains once, in the first
    result = []
    for module, lr in groups:
        decayed, not_decayed = split_by_decay(module, seen, decay_all=cfg.decay_norms_and_biases)
        lr = cfg.learning_rate if lr is None else lr
        for params, weight_decay in ((decayed, cfg.weight_decay), (not_decayed, 0.0)):
            if params:
                result.append({"params": params, "lr": lr, "weight_decay": weight_decay})
    if not result:
        raise ConfigError("nothing to train: no parameter of the model requires a gradient. Check the "
                          "freeze settings (finetune.freeze / finetune.train_only) and the fine-tune method")
    return result


def split_by_decay(module: nn.Module, seen: set[int], decay_all: bool = False) -> tuple[list, list]:
    """(decayed, not decayed) trainable parameters of `module`, in `module.parameters()` order.

    Not decayed: biases, the weights of normalisation layers (they set a scale, and pulling it
    to 0 fights the normalisation), and embeddings: AdamW's decoupled decay shrinks every row
    at every step, also the rows of tokens no batch used (a textual-inversion table's frozen
    words, rare tokens), which then drift to 0 for no reason in the data.
    """
    decayed: list[nn.Parameter] = []
    not_decayed: list[nn.Parameter] = []
    for module_name, sub in module.named_modules():
        keeps_scale = bool(_NORM_CLASS.search(type(sub).__name__)) or isinstance(sub, nn.Embedding)
        for name, param in sub.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            exempt = keeps_scale or name == "bias" or _DORA_MAGNITUDE in module_name
            (not_decayed if exempt and not decay_all else decayed).append(param)
    return decayed, not_decayed


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, where: str) -> None:
    """`optimizer.load_state_dict(state)`, or a ConfigError when the saved state belongs to another
    optimizer or other parameter groups (torch would raise a bare ValueError, or fail mid-step)."""
    saved, fresh = state["param_groups"], optimizer.param_groups
    saved_sizes, fresh_sizes = [len(g["params"]) for g in saved], [len(g["params"]) for g in fresh]
    # Optimizers add settings to their groups as they step (Prodigy), never drop them: a saved state
    # lacking one of ours is another optimizer's.
    missing = sorted({key for g in fresh for key in g} - {key for g in saved for key in g})
    if saved_sizes != fresh_sizes or missing:
        lacking = f", and its settings lack {missing}" if missing else ""
        raise ConfigError(
            f"{where} holds optimizer state for parameter groups of sizes {saved_sizes}{lacking}, but this "
            f"run's {type(optimizer).__name__} has groups of sizes {fresh_sizes}: it was written with another "
            "train.optimizer, other trainable parameters, or by a stablediff from before "
            "train.decay_norms_and_biases (then every weight decayed, in one group: resume it with "
            "--set train.decay_norms_and_biases=true --allow-config-change). Resume with the settings it "
            "was written with, or start afresh in a new run directory")
    optimizer.load_state_dict(state)


def _betas(cfg: TrainConfig) -> tuple[float, float]:
    return cfg.adam_beta1, cfg.adam_beta2


def _adamw(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Fused into one kernel per step (GPU, and CPU since torch 2.4: 4x faster than the
    multi-tensor path at the demo size), else the multi-tensor path. Both are deterministic."""
    options = dict(lr=cfg.learning_rate, betas=_betas(cfg), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(groups, fused=True, **options)
    except (RuntimeError, TypeError):  # an older torch, or a device without the fused kernel
        return torch.optim.AdamW(groups, **options)


def _adamw8bit(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """bitsandbytes' blockwise 8-bit AdamW (tensors under 4,096 values keep 32-bit state)."""
    try:  # its import's warning about 4-bit CPU kernels is silenced in stablediff/__init__.py
        import bitsandbytes
    except (ImportError, OSError, RuntimeError) as error:
        raise ConfigError(
            f"train.optimizer 'adamw8bit' needs the bitsandbytes package, which does not import here "
            f"({error}). Install it with `pip install bitsandbytes` (a CUDA GPU, or a CPU with a "
            "recent bitsandbytes), or choose train.optimizer 'adamw'") from error
    return bitsandbytes.optim.AdamW8bit(groups, lr=cfg.learning_rate, betas=_betas(cfg), eps=cfg.adam_epsilon,
                                        weight_decay=cfg.weight_decay)


def _adafactor(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """transformers' Adafactor with our LR and schedule: its own relative step size and
    parameter scaling off (the combination its docs give for an external LR)."""
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=cfg.learning_rate, relative_step=False, scale_parameter=False,
                     warmup_init=False, weight_decay=cfg.weight_decay)


def _prodigy(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Prodigy (Mishchenko & Defazio 2023) estimates the step size itself; train.learning_rate
    multiplies it (1.0 is the usual setting). Its estimate is shared by all groups, so they
    must have one learning rate."""
    from prodigyopt import Prodigy

    rates = sorted({group["lr"] for group in groups})
    if len(rates) > 1:
        raise ConfigError(f"train.optimizer 'prodigy' uses one learning rate for all the trained parts, but "
                          f"they have {rates}: drop the separate learning rate (e.g. "
                          "finetune.text_encoder.learning_rate), or choose another optimizer")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay" each time
        return Prodigy(groups, lr=cfg.learning_rate, betas=_betas(cfg), eps=cfg.adam_epsilon,
                       weight_decay=cfg.weight_decay)


def _rmsprop(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """torch's RMSprop; its weight decay is L2 (added to the gradient), as is SGD's."""
    momentum = 0.0 if cfg.momentum is None else cfg.momentum
    return torch.optim.RMSprop(groups, lr=cfg.learning_rate, momentum=momentum, weight_decay=cfg.weight_decay)


def _sgd(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    momentum = 0.9 if cfg.momentum is None else cfg.momentum
    return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


_BUILDERS: dict[str, Callable[[list[dict], TrainConfig], torch.optim.Optimizer]] = {
    "adamw": _adamw, "adamw8bit": _adamw8bit, "adafactor": _adafactor, "prodigy": _prodigy,
    "rmsprop": _rmsprop, "sgd": _sgd,
}
