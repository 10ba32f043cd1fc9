"""The pipeline of a fine-tune run's checkpoint: RUN_DIR/base plus the tensors that trained.

A fine-tune checkpoint holds only what trains (models/adapters.py): the UNet's
LoRA adapters (`unet/...lora_A.default.weight`, and their EMA under `ema/`) or
its unfrozen weights, and a text-encoder LoRA's adapters (`text_encoder/...`).
The frozen rest is the base, copied once into RUN_DIR/base as a diffusers
folder when the run started (finetune/base.py).
"""

from __future__ import annotations

from pathlib import Path

from stablediff import run_schema as schema
from stablediff.checkpoint import LoadedCheckpoint
from stablediff.errors import CheckpointError, MissingPathError
from stablediff.models.adapters import attach_lora, load_trained, merged_copy

BASE_FOLDER = "base"  # RUN_DIR/base: the base model as a diffusers folder
BASE_RECORD = "stablediff_base.json"  # inside it: where the base came from (finetune/base.py writes it)


def is_finetune_run(run_dir: Path) -> bool:
    return (Path(run_dir) / BASE_FOLDER / BASE_RECORD).is_file()


def is_finetune(meta: dict) -> bool:
    return schema.FINETUNE_BASE in meta


def base_folder(run_dir: Path) -> Path:
    folder = Path(run_dir) / BASE_FOLDER
    if not (folder / "model_index.json").is_file():
        raise MissingPathError(f"{run_dir} is a fine-tune run, but its base model copy {folder} is missing; it is "
                               "written when the run starts: run `stablediff finetune` on it again to restore it")
    return folder


def trained_group(loaded: LoadedCheckpoint, ema: bool) -> dict:
    """The UNet tensors to apply: the EMA's when asked and present, else the raw ones."""
    weights = schema.unprefixed(schema.EMA, loaded.tensors) if ema else {}
    return weights or schema.unprefixed(schema.UNET, loaded.tensors)


def finetuned_pipeline(run_dir: Path, loaded: LoadedCheckpoint, ema: bool = True, scale: float = 1.0):
    """The base with this checkpoint's training applied; LoRA adapters merged into it at `scale`."""
    from stablediff.models.pipeline_assembly import load_pipeline_folder

    source = f"{run_dir} step {loaded.step}"
    pipe = load_pipeline_folder(base_folder(run_dir))
    inversion = loaded.meta.get(schema.TEXTUAL_INVERSION)
    if inversion:  # the base with the new token: the UNet did not train
        from stablediff.models.token_vectors import add_token_vectors

        vectors = schema.unprefixed(schema.EMBEDDING, loaded.tensors)["vectors"]
        add_token_vectors(pipe.tokenizer, pipe.text_encoder, inversion["token"], vectors)
        return pipe
    unet_lora, text_lora = schema.lora_configs(loaded.meta)
    if unet_lora:
        attach_lora(pipe.unet, unet_lora)
    weights = trained_group(loaded, ema)
    if not weights:
        raise CheckpointError(f"{source} holds no trained UNet tensors")
    load_trained(pipe.unet, weights, source)
    if unet_lora:
        pipe.unet = merged_copy(pipe.unet, scale)
    pipe.unet.eval()
    text_weights = schema.unprefixed(schema.TEXT_ENCODER, loaded.tensors)
    if text_lora and text_weights:  # the text encoder's adapters (no EMA: the raw ones), merged the same way
        attach_lora(pipe.text_encoder, text_lora)
        load_trained(pipe.text_encoder, text_weights, f"{source} (text encoder)")
        pipe.text_encoder = merged_copy(pipe.text_encoder, scale)
    return pipe
