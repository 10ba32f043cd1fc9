"""The `ss_*` and `modelspec.*` metadata of a kohya-layout LoRA file (REFERENCE 1.3, 2.4).

A1111 decides which base model a LoRA is for from `ss_base_model_version` and
`ss_v2` (its LoRA page hides LoRAs for another SD version) and takes the alias
from `ss_output_name`; Civitai and the UIs list and filter by the other `ss_*`
keys. All values are strings (safetensors metadata), dicts and lists JSON as
kohya writes them. A checkpoint made by hand may lack any of the meta this
reads: a key is written when its value is known, and nothing is guessed.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from stablediff import run_schema as schema

FINETUNE_BASE = "finetune_base"  # meta: the model the fine-tune started from (kind, path, name, sha256)
TRAINING_STARTED_AT = "training_started_at"  # meta: unix time of the run's start
MODELSPEC_VERSION = "1.0.1"
# diffusers' prediction type -> modelspec's (kohya's sai_model_spec writes "epsilon" or "v")
_MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}


def _get(tree: Mapping[str, Any] | None, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def network_metadata(weights) -> dict[str, Any]:
    """dim, alpha and kohya's network args: conv_dim/conv_alpha for LoCon (LoRA on convolutions too),
    rank_dropout/module_dropout when the run had them on."""
    from stablediff.finetune.lora_files import TEXT_ENCODER
    from stablediff.models.lora_dropout import dropout_settings

    component = schema.UNET if schema.UNET in weights.modules else TEXT_ENCODER
    adapters = list(weights.modules[component].values())
    linear = [a for a in adapters if not a.is_conv] or adapters
    first = linear[0]
    out: dict[str, Any] = {"ss_network_module": "networks.lora", "ss_network_dim": first.rank,
                           "ss_network_alpha": weights.alpha(component, first)}
    conv = [a for a in adapters if a.is_conv]
    args = {"conv_dim": str(conv[0].rank), "conv_alpha": str(weights.alpha(component, conv[0]))} if conv else {}
    dropouts = dropout_settings(weights.configs.get(component))  # kohya: the strings as given, "0.1"
    out["ss_network_args"] = args | {key: str(p) for key, p in dropouts.items()}
    return out


def base_model_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What the LoRA was trained on: name and hashes of the base model (kohya's ss_sd_model_*)."""
    base = meta.get(FINETUNE_BASE) or {}
    out: dict[str, Any] = {"ss_base_model_version": base.get("model_version") or "sd_v1", "ss_v2": "False"}
    if base.get("name"):
        out["ss_sd_model_name"] = base["name"]
    if base.get("sha256"):
        out["ss_new_sd_model_hash"] = base["sha256"]
    path = Path(base["path"]) if base.get("path") else None
    if path is not None and path.is_file():  # kohya's ss_sd_model_hash: A1111's legacy 8-digit model hash
        from hashlib import sha256

        with open(path, "rb") as f:
            f.seek(0x100000)
            out["ss_sd_model_hash"] = sha256(f.read(0x10000)).hexdigest()[:8]
    return out


def training_metadata(meta: Mapping[str, Any], step: int) -> dict[str, Any]:
    config = meta.get(schema.CONFIG) or {}
    out: dict[str, Any] = {"ss_steps": step, "ss_training_finished_at": time.time()}
    known = {"ss_training_started_at": meta.get(TRAINING_STARTED_AT), "ss_seed": config.get("seed"),
             "ss_learning_rate": _get(config, "train.learning_rate"),
             "ss_max_train_steps": _get(config, "train.max_steps"),
             "ss_batch_size_per_device": _get(config, "train.batch_size"),
             "ss_prediction_type": _get(config, "train.prediction_type"),
             "ss_num_train_images": _get(meta, "sampler.num_samples")}
    out |= {k: v for k, v in known.items() if v is not None}
    if _get(config, "finetune.text_encoder.lora"):  # kohya's per-part rates
        unet_lr, text_lr = known["ss_learning_rate"], _get(config, "finetune.text_encoder.learning_rate")
        out |= {"ss_unet_lr": unet_lr, "ss_text_encoder_lr": unet_lr if text_lr is None else text_lr}
    resolution = _get(config, "data.resolution")
    if resolution:
        out["ss_resolution"] = str((resolution, resolution))  # kohya: "(512, 512)"
    source = _get(config, "data.source")
    if source:  # kohya: {folder name: {"n_repeats", "img_count"}}; the name only, paths tell usernames
        entry = {"n_repeats": 1, "img_count": out.get("ss_num_train_images", 0)}
        out["ss_dataset_dirs"] = {Path(str(source).rstrip("/")).name or str(source): entry}
    return out


def modelspec_metadata(title: str, meta: Mapping[str, Any], finished_at: float) -> dict[str, str]:
    config = meta.get(schema.CONFIG) or {}
    out = {"modelspec.sai_model_spec": MODELSPEC_VERSION, "modelspec.architecture": "stable-diffusion-v1/lora",
           "modelspec.implementation": "diffusers", "modelspec.title": title,
           "modelspec.date": datetime.fromtimestamp(finished_at, timezone.utc).isoformat(timespec="seconds")}
    resolution = _get(config, "data.resolution")
    if resolution:
        out["modelspec.resolution"] = f"{resolution}x{resolution}"
    prediction = _get(config, "train.prediction_type")
    if prediction:
        out["modelspec.prediction_type"] = _MODELSPEC_PREDICTION.get(prediction, prediction)
    return out


def kohya_metadata(meta: Mapping[str, Any], weights, output_name: str, step: int) -> dict[str, str]:
    """Every ss_*/modelspec.* value this checkpoint can tell, as strings."""
    values: dict[str, Any] = {"ss_output_name": output_name}
    values |= base_model_metadata(meta) | network_metadata(weights) | training_metadata(meta, step)
    values["ss_text_encoder_trained"] = "True" if "text_encoder" in weights.modules else "False"
    text = {k: _text(v) for k, v in values.items()}
    return text | modelspec_metadata(output_name, meta, float(values["ss_training_finished_at"]))
