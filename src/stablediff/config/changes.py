"""Which config keys a resumed run may change, and the key-by-key diff that says what did.

Every checkpoint holds the resolved config it was trained with. A resume with a
config that alters the data order, the model's shape, the objective, the
optimizer, the noise schedule or the text encoder would continue a different run
from the saved state, so the run refuses it (unless --allow-config-change).
Keys that only say how long, how often, where or on what hardware a run goes
(max_steps, logging, checkpoint intervals and retention, sample grids, replicas,
threads, device) change freely. RULES is the one table of that policy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

SAFE = "safe"
UNCLASSIFIED = "unclassified key"  # no rule names it: refused, since nobody has said it is harmless

# Dotted key, or a section as the default for its keys -> what a change alters (SAFE: nothing).
# The longest matching name wins: "train.max_steps" over "train".
RULES: dict[str, str] = {
    "seed": "data order",  # and every step's noise, timesteps and dropout
    "run_dir": SAFE,
    "data": "data order",
    "data.max_reject_fraction": SAFE,  # a threshold; what was accepted is in the data fingerprint
    "data.cache_dir": SAFE,
    "data.num_workers": SAFE,  # same samples in the same order with any number of workers
    "text_encoder": "text encoder",
    "vae": "model shape",
    "vae.train_steps": "autoencoder training",
    "vae.batch_size": "autoencoder training",
    "vae.learning_rate": "autoencoder training",
    "vae.kl_weight": "autoencoder training",
    "unet": "model shape",
    "noise": "noise schedule",
    "train": "objective",
    "train.batch_size": "data order",
    "train.gradient_accumulation_steps": "data order",
    **{f"train.{key}": "optimizer" for key in (
        "learning_rate", "warmup_steps", "lr_schedule", "weight_decay", "grad_clip",
        "ema_decay", "ema_half_life_images", "ema_warmup", "optimizer", "decay_norms_and_biases",
        "adam_beta1", "adam_beta2", "adam_epsilon", "momentum", "nesterov")},
    **{f"train.{key}": SAFE for key in (
        "max_steps", "mixed_precision", "gradient_checkpointing", "compile", "channels_last", "device",
        "validate_every", "validation_timesteps", "tensorboard", "log_every", "threads",
        "eval_every", "eval_metrics", "eval_samples")},
    "guard": SAFE,  # acts only when training diverges
    "checkpoint": SAFE,
    "sample": SAFE,
    "early_stopping": SAFE,  # decides when the run ends, not what any step does
    "finetune": "base model",
    "finetune.method": "model shape",
    "finetune.lora": "model shape",
    **{f"finetune.lora.{key}": "objective" for key in ("rank_dropout", "module_dropout")},  # regularisation
    "finetune.freeze": "trainable parameters",
    "finetune.train_only": "trainable parameters",
}

_MISSING = object()


def rule_for(key: str) -> str:
    """What changing `key` alters: the rule of the key itself or of its nearest section."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        rule = RULES.get(".".join(parts[:end]))
        if rule is not None:
            return rule
    return UNCLASSIFIED


@dataclass(frozen=True)
class ConfigChange:
    key: str
    old: object
    new: object
    kind: str  # what the change alters, SAFE when nothing

    @property
    def safe(self) -> bool:
        return self.kind == SAFE

    def describe(self) -> str:
        """`unet.block_out_channels: [32, 64] -> [32, 128]`"""
        return f"{self.key}: {show(self.old)} -> {show(self.new)}"

    def as_record(self) -> dict:
        return {"key": self.key, "old": None if self.old is _MISSING else self.old, "new": self.new,
                "kind": self.kind}


def show(value: object) -> str:
    if value is _MISSING:
        return "(not set)"
    return value if isinstance(value, str) else json.dumps(value)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"unet": {"layers_per_block": 1}} -> {"unet.layers_per_block": 1}; lists stay whole values."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def diff_configs(old: dict, new: dict, defaults: dict | None = None) -> list[ConfigChange]:
    """Every leaf key whose value differs, in the new config's order, each with its rule.

    A key the old config lacks (a checkpoint from a version before the key existed)
    is compared with its default from `defaults`; a key the new config lacks no
    longer exists and cannot matter.
    """
    old_flat, new_flat, default_flat = flatten(old), flatten(new), flatten(defaults or {})
    changes = []
    for key, after in new_flat.items():
        before = old_flat.get(key, default_flat.get(key, _MISSING))
        if before != after:
            changes.append(ConfigChange(key, before, after, rule_for(key)))
    return changes
