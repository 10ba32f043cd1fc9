"""What a run's checkpoint holds: tensor groups, meta keys, stages and the best metric (one place).

A checkpoint's tensors have flat names `<group>/<name>` (stored as
content-addressed chunks); its meta is plain JSON. Training writes them
(training/state.py), export reads them (models/run_export.py) and `ckpt info`
shows them. See training/state.py for what each stage saves.

Pure constants and tiny pure helpers: no torch, so any layer may import it.
"""

from __future__ import annotations

from typing import Any, Mapping

# -- stages (meta "stage") ---------------------------------------------------------------------
UNET_STAGE = "unet"  # stage 2: one checkpoint per UNet step
VAE_STAGE = "vae"  # stage 1: the autoencoder, before UNet step 0
VAE_CHECKPOINT_STEP = 0  # stage 1 is saved as step 0 and replaced by each newer save, then by stage 2's step 0

# -- tensor groups (the part of a tensor's name before the first "/") ----------------------------
VAE = "vae"  # the autoencoder (frozen after stage 1: costs no bytes after the first save)
UNET = "unet"  # the UNet being trained (its LoRA adapters, when it has them: names with `lora_`)
EMA = "ema"  # the UNet's moving average
EMBEDDING = "embedding"  # textual inversion: embedding/vectors, the new token's (num_vectors, width)
# A text-encoder LoRA's adapters, by the encoder's state-dict names (`<module>.lora_A.default.weight`); their
# LoraConfig is meta lora_config["text_encoder"]
TEXT_ENCODER = "text_encoder"
OPTIM = "optim"  # the optimizer's per-parameter tensors of stage 2: optim/<param index>/<key>[/<key>]
VAE_OPTIM = "vae_optim"  # the same for stage 1
RNG = "rng"  # the global generators' states: rng/torch, rng/numpy, rng/cuda/<device>
RNG_RANK = "rng_rank"  # other ranks' generators under torchrun: rng_rank/<rank>/...

# -- meta keys ---------------------------------------------------------------------------------
STAGE = "stage"
STEP = "step"
VAE_STEP = "vae_step"
CONFIG = "config"  # the resolved RunConfig, as JSON
FINGERPRINTS = "fingerprints"  # code, data and text-encoder fingerprints
RNG_META = "rng"  # python's and numpy's generator state (the tensors hold the rest)
OPTIMIZER_PARAM_GROUPS = "optimizer_param_groups"
# Per-parameter optimizer state that is a Python number, not a tensor ({"<param index>/<key>": value}:
# Adafactor's, Prodigy's and bitsandbytes' step counts); absent when there is none (torch's optimizers).
OPTIMIZER_SCALARS = "optimizer_scalars"
VAE_REPORT = "vae_report"  # a finished stage 1's report
VAE_SCALING_FACTOR = "vae_scaling_factor"
LORA_CONFIG = "lora_config"  # the UNet's peft LoraConfig as a dict (rank, alpha, target modules), and under
# its key "text_encoder" the text encoder's, when that trained a LoRA too (lora_configs splits them)
FINETUNE_BASE = "finetune_base"  # a fine-tune's base: kind, path, name, step, sha256 (finetune/base.py)
TRAINING_STARTED_AT = "training_started_at"  # unix time of the run's first start (LoRA metadata reports it)
TEXTUAL_INVERSION = "textual_inversion"  # {"token", "num_vectors"} of a textual-inversion run
EARLY_STOPPING = "early_stopping"  # the early-stopping tracker's state (training/early_stop.py)
# The best mark's tracker when checkpoint.best_metric is not early_stopping.metric (the same state's shape)
BEST_TRACKER = "best_tracker"
# Meta that `ckpt info` leaves out: large, and read by the trainer rather than by people.
BULKY_META = (CONFIG, RNG_META, OPTIMIZER_PARAM_GROUPS, OPTIMIZER_SCALARS)

# -- the best checkpoint -----------------------------------------------------------------------
BEST_METRIC = "val_loss"  # what retention's keep_best and `--best` rank checkpoints by (lower is better)
# Every metric a checkpoint can carry, with its direction ("min": lower is better). The one home of both:
# config validation, retention, early stopping, `stablediff eval` and the report read them from here;
# evaluation/registry.py holds how each is computed.
METRIC_MODES = {
    "val_loss": "min",  # the validation loss at fixed timesteps and noise
    "fd": "min",  # Frechet distance to the real held-out images' features
    "kid": "min",  # kernel inception distance, the same features
    "adherence": "max",  # share of generated digits the classifier reads as the digit asked for
    "bpd": "min",  # bits per (latent) dimension from the variational bound
    "clip": "max",  # CLIP score of the images against their prompts
}


def metric_mode(name: str) -> str:
    """"min" or "max" for a known metric; a KeyError names the known ones."""
    try:
        return METRIC_MODES[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(METRIC_MODES)}") from None


def prefixed(group: str, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """`tensors` named into `group`: {"w": t} -> {"unet/w": t}."""
    return {f"{group}/{name}": value for name, value in tensors.items()}


def unprefixed(group: str, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """The tensors of `group`, with the group taken off their names."""
    start = len(group) + 1
    return {name[start:]: value for name, value in tensors.items() if name.startswith(group + "/")}


def lora_configs(meta: Mapping[str, Any]) -> tuple[dict | None, dict | None]:
    """(the UNet's LoraConfig, the text encoder's) from a checkpoint's meta; None for one that has none."""
    config = dict(meta.get(LORA_CONFIG) or {})
    text_encoder = config.pop(TEXT_ENCODER, None)
    return config or None, text_encoder


def group_of(name: str) -> str:
    return name.split("/")[0]


def stage_of(meta: Mapping[str, Any]) -> str:
    """A checkpoint's stage; checkpoints from before stages were recorded are stage 2's."""
    return meta.get(STAGE, UNET_STAGE)
