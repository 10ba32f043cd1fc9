"""Rebuild a pipeline from a run directory's checkpoint store (any step, best, EMA or raw weights).

A checkpoint holds the VAE, UNet and EMA tensors and, in its meta, the resolved
config and the VAE scaling factor (training/state.py). The text encoder is not
in it (it is frozen): it is loaded the way the run loaded it, from the config's
`text_encoder.name`. The result is the pipeline `train` itself exports
(training/run.py `export_and_sample`), for whichever checkpoint is asked for.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stablediff import run_schema as schema
from stablediff.checkpoint import CheckpointStore, LoadedCheckpoint, RetentionPolicy
from stablediff.checkpoint.retention import best_steps
from stablediff.checkpoint.run_stores import run_stores
from stablediff.run_schema import BEST_METRIC
from stablediff.errors import CheckpointError, MissingPathError


def open_run_store(run_dir: Path) -> tuple[CheckpointStore, list[CheckpointStore]]:
    """The run's primary store and its configured replicas (fallbacks for damaged chunks)."""
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints" / "manifests").is_dir():
        raise MissingPathError(f"{run_dir} is not a run directory with checkpoints (no checkpoints/manifests/); "
                               "give the --run-dir of a `stablediff train` run")
    return run_stores(run_dir)


def choose_step(store: CheckpointStore, step: int | None, best: bool) -> int | None:
    """`step`, the best by val_loss (`best`), or None for the newest that verifies."""
    if step is not None and best:
        raise CheckpointError("give either --step or --best, not both")
    if not best:
        return step
    ranked = best_steps(store.list(), RetentionPolicy(keep_best=1, best_metric=BEST_METRIC))
    if not ranked:
        raise CheckpointError(f"--best: no checkpoint in {store.location} records {BEST_METRIC}, so none is best; "
                              "give --step N (see `stablediff ckpt list`) or leave both out for the newest")
    return ranked[0]


def load_run_checkpoint(run_dir: Path, step: int | None = None, best: bool = False) -> LoadedCheckpoint:
    store, replicas = open_run_store(run_dir)
    loaded = store.load(choose_step(store, step, best), fallbacks=replicas)
    if loaded.meta.get(schema.STAGE) != schema.UNET_STAGE or schema.CONFIG not in loaded.meta:
        raise CheckpointError(f"checkpoint step {loaded.step} of {run_dir} is not a text-to-image UNet checkpoint "
                              f"(stage {loaded.meta.get(schema.STAGE)!r}); it cannot be exported as a pipeline")
    return loaded


def lora_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA adapter tensors of a checkpoint's UNet (peft names contain `lora_`)."""
    return {name: t for name, t in schema.unprefixed(schema.UNET, tensors).items() if "lora_" in name}


def pipeline_from_run(run_dir: Path, step: int | None = None, best: bool = False, ema: bool = True,
                      trust_pickle: bool = False):
    """The StableDiffusionPipeline of a run's checkpoint: newest by default, `step`, or `best` by val_loss;
    the EMA UNet unless `ema=False`."""
    loaded = load_run_checkpoint(run_dir, step, best)
    return pipeline_from_checkpoint(loaded, ema, trust_pickle, source=f"{run_dir} step {loaded.step}")


def pipeline_from_checkpoint(loaded: LoadedCheckpoint, ema: bool, trust_pickle: bool, source: str):
    from stablediff.config import RunConfig
    from stablediff.models.pipeline_assembly import assemble_pipeline
    from stablediff.models.build import build_noise_scheduler, build_unet, build_vae, vae_downscale
    from stablediff.models.single_file_pipeline import load_weights
    from stablediff.models.text_encoder import load_text_encoder

    if lora_tensors(loaded.tensors):
        raise CheckpointError(f"{source} holds LoRA adapters; export them with `stablediff ckpt export --format lora` "
                              "(or lora-diffusers) and apply them to the base model they were trained on")
    config = RunConfig.model_validate(loaded.meta[schema.CONFIG])
    if not getattr(config.vae, "enabled", True):
        raise CheckpointError(f"{source} is a pixel-space model (no VAE), which is not a Stable Diffusion pipeline; "
                              "use its export/pixel folder (UNet and scheduler) instead")
    text_encoder = load_text_encoder(config.text_encoder.name, config.text_encoder.max_length, trust_pickle)
    vae = build_vae(config.vae, config.data.resolution, trust_pickle)
    load_weights(vae, schema.unprefixed(schema.VAE, loaded.tensors), "VAE", source)
    vae.register_to_config(scaling_factor=loaded.meta[schema.VAE_SCALING_FACTOR])
    latent_size = config.data.resolution // vae_downscale(vae)
    unet = build_unet(config.unet, vae.config.latent_channels, latent_size, text_encoder.hidden_size)
    weights = schema.unprefixed(schema.EMA if ema else schema.UNET, loaded.tensors)
    if not weights:
        raise CheckpointError(f"{source} has no {'EMA' if ema else 'raw UNet'} weights; try "
                              f"{'--no-ema' if ema else '--ema'}")
    load_weights(unet, weights, "UNet", source)
    scheduler = build_noise_scheduler(config.noise, config.train.prediction_type)
    return assemble_pipeline(vae.eval(), text_encoder.model, text_encoder.tokenizer, unet.eval(),
                             dict(scheduler.config))

