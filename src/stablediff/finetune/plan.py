"""Before any work: the base is loaded, the config is squared with it, and the trainable set is checked.

The architecture, noise schedule, prediction type and text encoder come from the
base. A key the user set that contradicts the base (another prediction_type,
another UNet shape) is an error naming both values; keys left unset take the
base's values, so the run's config.yaml says what really trains. The LoRA
targets and freeze patterns are tried on a weightless ("meta") copy of the
base UNet, so a typo fails in seconds and nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stablediff.config import RunConfig
from stablediff.errors import ConfigError
from stablediff.finetune.base import Base, load_base, load_saved_base

UNET_KEYS = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "attention_head_dim",
             "norm_num_groups")
VAE_KEYS = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups")
NOISE_KEYS = {"num_train_timesteps": "num_train_timesteps", "beta_schedule": "beta_schedule",
              "beta_start": "beta_start", "beta_end": "beta_end", "rescale_zero_terminal_snr": "rescale_betas_zero_snr"}


@dataclass
class FinetunePlan:
    config: RunConfig  # resolved against the base
    base: Base  # the base as loaded (RUN_DIR/base on a resume)
    saved: bool  # RUN_DIR/base exists already


def plan_finetune(config: RunConfig, run_dir: Path, trust_pickle: bool = False) -> FinetunePlan:
    if config.finetune is None:
        raise ConfigError("this config has no finetune section; `stablediff finetune` needs finetune.base (the model "
                          "to start from) -- see configs such as digits-lora-nine -- or use `stablediff train`")
    saved = load_saved_base(run_dir)
    base = saved or load_base(config.finetune.base, trust_pickle, config.finetune.tokenizer)
    resolved = resolve_against_base(config, base)
    check_trainable(base.pipe.unet.config, resolved)
    return FinetunePlan(resolved, base, saved is not None)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _contradiction(key: str, given, base_value, spec: str) -> ConfigError:
    return ConfigError(f"{key} = {given!r} contradicts the base {spec}, whose value is {base_value!r}; a fine-tune "
                       f"keeps the base's architecture and noise schedule: remove {key} from the config")


def _take_from_base(section, values: dict, name: str, spec: str) -> dict:
    """The section's values with the base's filled in; a key the user set to another value is an error."""
    dumped = section.model_dump(mode="json")
    for key, base_value in values.items():
        base_value = _plain(base_value)
        if key in section.model_fields_set and _plain(getattr(section, key)) != base_value:
            raise _contradiction(f"{name}.{key}", getattr(section, key), base_value, spec)
        dumped[key] = base_value
    return dumped


def resolve_against_base(config: RunConfig, base: Base) -> RunConfig:
    spec = config.finetune.base
    for name in ("preset", "diffusers_config"):
        if getattr(config.unet, name) is not None:
            raise ConfigError(f"unet.{name} is set, but a fine-tune's UNet is the base's ({spec}); remove it")
    if "enabled" in config.vae.model_fields_set and not config.vae.enabled:
        raise ConfigError(f"vae.enabled: false, but the base {spec} is a latent model with a VAE; remove it")
    if "name" in config.text_encoder.model_fields_set:
        raise ConfigError(f"text_encoder.name is set, but a fine-tune uses its base's text encoder ({spec}); remove it")
    pipe = base.pipe
    unet_values = {k: pipe.unet.config[k] for k in UNET_KEYS if isinstance(pipe.unet.config[k], (int, list, tuple))}
    if not isinstance(unet_values.get("attention_head_dim"), int):
        unet_values.pop("attention_head_dim", None)  # per-block head counts: not expressible in UNetConfig
    vae_values = {k: pipe.vae.config[k] for k in VAE_KEYS}
    noise_values = {ours: pipe.scheduler.config[theirs] for ours, theirs in NOISE_KEYS.items()
                    if theirs in pipe.scheduler.config}
    dump = config.model_dump(mode="json")
    dump["unet"] = _take_from_base(config.unet, unet_values, "unet", spec)
    dump["vae"] = _take_from_base(config.vae, vae_values, "vae", spec)
    dump["noise"] = _take_from_base(config.noise, noise_values, "noise", spec)
    dump["train"] = _take_from_base(config.train, {"prediction_type": base.prediction_type}, "train", spec)
    max_length = min(int(pipe.tokenizer.model_max_length), 512)
    dump["text_encoder"] = _take_from_base(config.text_encoder, {"max_length": max_length}, "text_encoder", spec)
    if "resolution" not in config.data.model_fields_set:  # the size the base was trained at
        downscale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        dump["data"]["resolution"] = int(pipe.unet.config.sample_size) * downscale
    return RunConfig.model_validate(dump)


def check_trainable(unet_config, config: RunConfig) -> None:
    """The LoRA targets and freeze patterns, tried on a weightless copy of the base UNet."""
    from diffusers import UNet2DConditionModel

    from stablediff.finetune.trainable import make_trainable

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    make_trainable(unet, config.finetune, config.seed)
