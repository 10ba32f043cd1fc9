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
from stablediff.io.run_files import read_eval


def open_run_store(run_dir: Path) -> tuple[CheckpointStore, list[CheckpointStore]]:
    """The run's primary store and its configured replicas (fallbacks for damaged chunks)."""
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints" / "manifests").is_dir():
        raise MissingPathError(f"{run_dir} is not a run directory with checkpoints (no checkpoints/manifests/); "
                               "give the --run-dir of a `stablediff train` run")
    return run_stores(run_dir)


def choose_step(store: CheckpointStore, step: int | None, best: bool, run_dir: Path | None = None,
                prefer_best: bool = False) -> int | None:
    """`step`; the best (`best`, or `prefer_best` when one exists: a fine-tune's default); else None for the
    newest that verifies."""
    if step is not None and best:
        raise CheckpointError("give either --step or --best, not both")
    if step is not None or not (best or prefer_best):
        return step
    chosen = best_step(store, run_dir)
    if chosen is None and best:
        raise CheckpointError(f"--best: no checkpoint in {store.location} records {BEST_METRIC}, so none is best; "
                              "give --step N (see `stablediff ckpt list`) or leave both out for the newest")
    return chosen


def best_step(store: CheckpointStore, run_dir: Path | None = None) -> int | None:
    """The run's best checkpoint: the mark in RUN_DIR/eval.json while that checkpoint exists, else the best
    by the marked metric (val_loss, lower is better, when there is no mark); None when nothing ranks."""
    summaries = store.list()
    mark = read_eval(run_dir).get("best") if run_dir is not None else None
    mark = mark if isinstance(mark, dict) else {}
    if mark.get("step") in {s.step for s in summaries if s.valid}:
        return int(mark["step"])
    policy = RetentionPolicy(keep_best=1, best_metric=mark.get("metric", BEST_METRIC), best_mode=mark.get("mode", "min"))
    ranked = best_steps(summaries, policy)
    return ranked[0] if ranked else None


def load_run_checkpoint(run_dir: Path, step: int | None = None, best: bool = False,
                        prefer_best: bool | None = None) -> LoadedCheckpoint:
    """`prefer_best` None: the best by default for a fine-tune run, the newest for a training run."""
    from stablediff.models.finetuned_run import is_finetune_run

    store, replicas = open_run_store(run_dir)
    prefer = is_finetune_run(run_dir) if prefer_best is None else prefer_best
    loaded = store.load(choose_step(store, step, best, run_dir, prefer), fallbacks=replicas)
    if loaded.meta.get(schema.STAGE) != schema.UNET_STAGE or schema.CONFIG not in loaded.meta:
        raise CheckpointError(f"checkpoint step {loaded.step} of {run_dir} is not a text-to-image UNet checkpoint "
                              f"(stage {loaded.meta.get(schema.STAGE)!r}); it cannot be exported as a pipeline")
    return loaded


def lora_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA adapter tensors of a checkpoint's UNet (peft names contain `lora_`)."""
    return {name: t for name, t in schema.unprefixed(schema.UNET, tensors).items() if "lora_" in name}


def pipeline_from_run(run_dir: Path, step: int | None = None, best: bool = False, ema: bool = True,
                      trust_pickle: bool = False, prefer_best: bool | None = None):
    """The StableDiffusionPipeline of a run's checkpoint: `step`, `best`, or by default the newest (a
    training run) or the best (a fine-tune); the EMA UNet unless `ema=False`."""
    loaded = load_run_checkpoint(run_dir, step, best, prefer_best)
    return pipeline_from_checkpoint(loaded, ema, trust_pickle, source=f"{run_dir} step {loaded.step}", run_dir=run_dir)


def pipeline_from_checkpoint(loaded: LoadedCheckpoint, ema: bool, trust_pickle: bool, source: str,
                             run_dir: Path | None = None, merge_scale: float = 1.0):
    """The pipeline of a training run's checkpoint, or of a fine-tune's (its base in `run_dir` plus what
    trained; LoRA adapters merged at `merge_scale`)."""
    from stablediff.models.finetuned_run import finetuned_pipeline, is_finetune

    if is_finetune(loaded.meta):
        return finetuned_pipeline(run_dir, loaded, ema, scale=merge_scale)
    return _trained_pipeline(loaded, ema, trust_pickle, source)


def _trained_pipeline(loaded: LoadedCheckpoint, ema: bool, trust_pickle: bool, source: str):
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

