"""LoRA / LoCon / DoRA adapters for the UNet (and LoRA for the text encoder): targets resolved against the
real model, then attached.

A target is a module-name suffix, as peft matches it (`to_q` matches
`...attn1.to_q`). Presets (config/finetune.py) expand to suffixes; every one
of them must name at least one Linear or Conv2d of this UNet, because peft
would otherwise train nothing for it without a word. The text encoder's targets are
fixed per encoder family (config/finetune.py TEXT_ENCODER_TARGETS: kohya's default).
"""

from __future__ import annotations

import torch

from stablediff.config.finetune import ALL_LINEAR, LORA_TARGET_PRESETS, TEXT_ENCODER_TARGETS, LoraSettings
from stablediff.errors import ConfigError
from stablediff.models.adapters import attach_lora
from stablediff.models.lora_dropout import install_lora_dropout

ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _short_suffix(name: str) -> str:
    """The name's last part, with its parent when that part is an index (`to_out.0`, not `0`)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if len(parts) > 1 and parts[-1].isdigit() else parts[-1]


def resolve_targets(targets: str | list[str], model: torch.nn.Module) -> list[str]:
    """The module-name suffixes to adapt; each must match a Linear/Conv2d of `model`."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, ADAPTABLE)}
    if targets == ALL_LINEAR:
        return sorted(name for name, module in layers.items() if isinstance(module, torch.nn.Linear))
    suffixes = list(LORA_TARGET_PRESETS.get(targets, ())) if isinstance(targets, str) else list(targets)
    missing = [s for s in suffixes if not any(_matches(name, s) for name in layers)]
    preset = isinstance(targets, str)
    if missing and not preset:
        examples = sorted({_short_suffix(name) for name in layers})[:30]
        raise ConfigError(f"finetune.lora.targets: {', '.join(map(repr, missing))}: no Linear or Conv2d layer "
                          f"of the base UNet has that name; layer names end in e.g. {', '.join(examples)}. Give "
                          "module-name suffixes such as to_q or ff.net.2, or a preset: attn, attn+ff, all-linear, conv")
    found = [s for s in suffixes if s not in missing]  # a preset names what SD UNets have; small ones lack some
    if not found:
        raise ConfigError(f"finetune.lora.targets: the preset {targets!r} matches no layer of the base UNet")
    return found


def lora_config(settings: LoraSettings, model: torch.nn.Module) -> dict:
    """peft LoraConfig keys (JSON-ready: stored in each checkpoint's meta to rebuild the adapters), and kohya's
    rank_dropout/module_dropout when they are on (models/lora_dropout.py; peft has no such option)."""
    config = {"r": settings.rank, "lora_alpha": settings.scale_alpha, "lora_dropout": settings.dropout,
              "target_modules": resolve_targets(settings.targets, model),
              "init_lora_weights": True if settings.init == "default" else "gaussian",
              "use_dora": settings.dora}
    dropouts = {"rank_dropout": settings.rank_dropout, "module_dropout": settings.module_dropout}
    return config | {key: p for key, p in dropouts.items() if p > 0}


def add_lora(model: torch.nn.Module, settings: LoraSettings, seed: int) -> dict:
    """Attach the adapters (initialised from `seed`: a fresh run is reproducible) with their rank/module
    dropout, and return their config."""
    config = lora_config(settings, model)
    attach_seeded(model, config, seed)
    install_lora_dropout(model, settings.rank_dropout, settings.module_dropout)
    return config


def text_encoder_targets(model: torch.nn.Module) -> list[str]:
    """The attention and MLP Linear suffixes of this text encoder's family (CLIP or BERT), each one present."""
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for suffixes in TEXT_ENCODER_TARGETS.values():
        if all(any(_matches(name, s) for name in linear) for s in suffixes):
            return list(suffixes)
    raise ConfigError(f"finetune.text_encoder.lora: the text encoder {type(model).__name__} is neither a CLIP nor "
                      f"a BERT text model (its Linear layers end in e.g. "
                      f"{', '.join(sorted({_short_suffix(n) for n in linear})[:12])}), so stablediff does not know "
                      "which of its layers to adapt; train the UNet's LoRA alone (finetune.text_encoder.lora: false)")


def add_text_encoder_lora(model: torch.nn.Module, settings: LoraSettings, seed: int) -> dict:
    """Adapters on the text encoder's attention and MLP (seeded like the UNet's); their LoraConfig."""
    config = {"r": settings.rank, "lora_alpha": settings.scale_alpha, "lora_dropout": 0.0,
              "target_modules": text_encoder_targets(model), "init_lora_weights": True, "use_dora": False}
    attach_seeded(model, config, seed + 1)  # not the UNet's stream: its A matrices would repeat in the encoder's
    return config


def attach_seeded(model: torch.nn.Module, config: dict, seed: int) -> None:
    """Attach adapters initialised from `seed` alone, leaving the global random stream as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attach_lora(model, config)
