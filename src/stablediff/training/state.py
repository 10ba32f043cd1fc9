"""What a resumable checkpoint holds, and how it is taken from and put back into a run.

The names (tensor groups, meta keys, stages) are defined in stablediff/run_schema.py.
Every checkpoint records its stage in meta "stage".

Stage 2 ("unet"), one checkpoint per UNet step. Tensors (flat names, stored as
content-addressed chunks):
  vae/*            the autoencoder (frozen after stage 1: costs no bytes after the first save)
  unet/*, ema/*    the UNet and its moving average
  embedding/*, text_encoder/*  a fine-tune's trainable part of the text encoder, when it has one
  optim/<i>/<key>  the optimizer's per-parameter tensors (AdamW: exp_avg, exp_avg_sq, step; a nested
                   dict of state, as bitsandbytes keeps, adds a level: optim/<i>/<key>/<key>)
  rng/torch, rng/numpy, rng/cuda/<d>  the global generators' states
JSON meta: stage, step and image counters, data-order position, optimizer param
groups and per-parameter numbers that are not tensors (optimizer_scalars),
LR-schedule state, python's RNG state, the resolved config, the VAE report and
the code/data fingerprints. Everything else in a run is a pure
function of these (per-step randomness is seeded by (seed, step, rank)).

Stage 1 ("vae") comes before UNet step 0, so its checkpoints are stored as step
0, each replacing the one before, and stage 2's step 0 replaces the last (the
store's steps stay the run's UNet steps for every tool). Tensors vae/*,
vae_optim/<i>/<key> (AdamW's state) and rng/*; meta vae_step, vae_loss, the
optimizer's param groups, the RNG, the config and fingerprints. A finished stage 1
drops the optimizer state and records vae_report and vae_scaling_factor instead.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stablediff import run_schema as schema
from stablediff.models.adapters import load_trained, trained_tensors
from stablediff.training.optim import load_optimizer_state
from stablediff.version import __version__

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/stablediff: git runs there
CONTINUE_ROLLBACK = "continue_rollback"  # meta key find_resume adds: the rollback record to continue (not saved)


def capture(state, vae: torch.nn.Module | None, config_dump: dict, fingerprints: dict,
            other_ranks_rng: list[tuple[dict, dict]] = ()) -> tuple[dict, dict]:
    """(tensors, meta) of a UNetTrainState at a step boundary; tensors are views, not copies.

    `other_ranks_rng`: (tensors, meta) of `local_rng()` from ranks 1..N-1 under torchrun.
    """
    tensors = model_tensors(state, vae)
    optim_tensors, optim_meta = optimizer_snapshot(schema.OPTIM, state.optimizer)
    tensors.update(optim_tensors)
    rng_tensors, rng_meta = local_rng()
    tensors.update(schema.prefixed(schema.RNG, rng_tensors))
    for rank, (ranked_tensors, ranked_meta) in enumerate(other_ranks_rng, start=1):
        tensors.update(schema.prefixed(f"{schema.RNG_RANK}/{rank}", ranked_tensors))
        rng_meta.setdefault("ranks", {})[str(rank)] = ranked_meta
    meta = {
        schema.STAGE: schema.UNET_STAGE,
        schema.STEP: state.step,
        "images_seen": state.images_seen,
        "sampler": state.order.state_dict(),  # the data order; key spelled "sampler" so old checkpoints resume
        **optim_meta,
        "lr_scheduler": _plain(state.lr_scheduler.state_dict()),
        schema.RNG_META: rng_meta,
        "grad_scaler": _plain(state.precision.state_dict()),
        "guard": state.guard.state_dict() if state.guard is not None else None,
        "lr_scale": state.lr_scale,
        "skipped_batches": state.skipped_batches,
        schema.CONFIG: config_dump,
        schema.FINGERPRINTS: fingerprints,
        **state.extra,
    }
    return tensors, meta


def model_tensors(state, vae: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """vae/*, unet/*, ema/* and, with textual inversion, embedding/* (text_encoder/* with a text-encoder
    LoRA). A fine-tune (`trained_only`) keeps only
    what trains: the frozen rest is its base (RUN_DIR/base), not checkpoint bytes."""
    tensors: dict[str, torch.Tensor] = {}
    if vae is not None:  # pixel-space models and fine-tunes have none
        tensors.update(schema.prefixed(schema.VAE, vae.state_dict()))
    unet, ema = state.unet.state_dict(), state.ema.state_dict()
    if state.trained_only:
        names = set(trained_tensors(state.unet))
        unet, ema = ({k: v for k, v in sd.items() if k in names} for sd in (unet, ema))
    tensors.update(schema.prefixed(schema.UNET, unet))
    tensors.update(schema.prefixed(schema.EMA, ema))
    if state.live_text is not None:  # embedding/* or text_encoder/* (its `group`)
        tensors.update(schema.prefixed(state.live_text.group, state.live_text.state_dict()))
    return tensors


def local_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's global generators: torch (and CUDA) and numpy as tensors, python's as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{device}"] = cuda_state
    np_state = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    return tensors, {"python": _plain(random.getstate()), "numpy": [np_state[0], *map(_plain, np_state[2:])]}


def restore_local_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda/")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    np.random.set_state((meta["numpy"][0], tensors["numpy"].numpy().astype(np.uint32), *meta["numpy"][1:]))
    random.setstate(_tuples(meta["python"]))


def restore(state, tensors: dict[str, torch.Tensor], meta: dict, rank: int = 0) -> None:
    """Put a checkpoint back into a freshly built UNetTrainState (same config).

    Rank r restores its own global RNG when the checkpoint has it (saved with >= r+1
    ranks); a rank the checkpoint did not have keeps its fresh seeding. A checkpoint
    that a divergence rollback went back to carries the rollback's record in
    `meta[CONTINUE_ROLLBACK]` (put there by find_resume): the rolled-back trajectory
    then continues (lowered LR, rollback count, skipped batches; training/rollback.py).
    """
    if state.trained_only:
        load_trained(state.unet, schema.unprefixed(schema.UNET, tensors), "the checkpoint's UNet")
        load_trained(state.ema.model, schema.unprefixed(schema.EMA, tensors), "the checkpoint's EMA")
    else:
        state.unet.load_state_dict(schema.unprefixed(schema.UNET, tensors))
        state.ema.load_state_dict(schema.unprefixed(schema.EMA, tensors))
    if state.live_text is not None:
        state.live_text.load_state_dict(schema.unprefixed(state.live_text.group, tensors))
    restore_optimizer(state.optimizer, schema.OPTIM, tensors, meta, f"the checkpoint of step {meta[schema.STEP]}")
    state.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    state.order.load_state_dict(meta["sampler"])  # meta key "sampler" = the data order (old spelling, kept)
    state.step, state.images_seen = int(meta[schema.STEP]), int(meta["images_seen"])
    state.precision.load_state_dict(meta.get("grad_scaler") or {})
    if state.guard is not None and meta.get("guard"):
        state.guard.load_state_dict(meta["guard"])
    state.lr_scale = float(meta.get("lr_scale", 1.0))  # already applied in the saved schedule and optimizer
    state.skipped_batches, state.pending_skip = int(meta.get("skipped_batches", 0)), 0
    if rank == 0:
        restore_local_rng(schema.unprefixed(schema.RNG, tensors), meta[schema.RNG_META])
    elif str(rank) in meta[schema.RNG_META].get("ranks", {}):
        rank_group = f"{schema.RNG_RANK}/{rank}"
        restore_local_rng(schema.unprefixed(rank_group, tensors), meta[schema.RNG_META]["ranks"][str(rank)])
    if meta.get(CONTINUE_ROLLBACK):
        from stablediff.training.rollback import continue_rollback

        continue_rollback(state, meta[CONTINUE_ROLLBACK])


def vae_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return schema.unprefixed(schema.VAE, tensors)


def unet_resume(loaded):
    """`loaded` if it is a stage-2 checkpoint (stage 2 resumes from it), else None."""
    return loaded if loaded is not None and schema.stage_of(loaded.meta) == schema.UNET_STAGE else None


def capture_vae(vae_state, config_dump: dict, fingerprints: dict, finished: dict | None = None) -> tuple[dict, dict]:
    """(tensors, meta) of stage 1 at a step boundary. `finished`: {"vae_report", "vae_scaling_factor"}
    once it is done; the optimizer state is then left out (nothing resumes it)."""
    tensors = schema.prefixed(schema.VAE, vae_state.vae.state_dict())
    rng_tensors, rng_meta = local_rng()
    tensors.update(schema.prefixed(schema.RNG, rng_tensors))
    meta = {schema.STAGE: schema.VAE_STAGE, schema.VAE_STEP: vae_state.step, "vae_loss": vae_state.last_loss,
            schema.RNG_META: rng_meta, schema.CONFIG: config_dump, schema.FINGERPRINTS: fingerprints}
    if finished is None:
        optim_tensors, optim_meta = optimizer_snapshot(schema.VAE_OPTIM, vae_state.optimizer)
        tensors.update(optim_tensors)
        meta.update(optim_meta)
    else:
        meta.update(finished)
    return tensors, meta


def restore_vae(vae_state, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Put an unfinished stage-1 checkpoint back into a freshly built `VAETrainState`."""
    vae_state.vae.load_state_dict(schema.unprefixed(schema.VAE, tensors))
    restore_optimizer(vae_state.optimizer, schema.VAE_OPTIM, tensors, meta, "the stage-1 checkpoint")
    vae_state.step, vae_state.last_loss = int(meta[schema.VAE_STEP]), float(meta["vae_loss"])
    restore_local_rng(schema.unprefixed(schema.RNG, tensors), meta[schema.RNG_META])


def resume_message(loaded) -> str:
    meta = loaded.meta
    if schema.stage_of(meta) != schema.VAE_STAGE:
        return f"resumed from step {loaded.step}"
    if meta.get(schema.VAE_REPORT):
        return "resumed after stage 1: the trained autoencoder comes from the checkpoint, not trained again"
    return f"resumed stage 1 (autoencoder) from its step {meta[schema.VAE_STEP]}"


def optimizer_snapshot(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of an optimizer's state; tensors are views, not copies.

    Each per-parameter tensor is `<prefix>/<param index>/<key>` (a nested dict of state adds
    `/<key>` levels); the per-parameter values that are Python numbers (Adafactor's, Prodigy's and
    bitsandbytes' step counts) go into meta as they are, so they come back as numbers, not tensors.
    """
    optim = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, per_param in optim["state"].items():
        _flatten_state(str(index), per_param, tensors, scalars)
    meta: dict[str, Any] = {schema.OPTIMIZER_PARAM_GROUPS: optim["param_groups"]}
    if scalars:  # absent for torch's optimizers, as in checkpoints from before it existed
        meta[schema.OPTIMIZER_SCALARS] = scalars
    return schema.prefixed(prefix, tensors), meta


def restore_optimizer(optimizer: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor],
                      meta: dict, where: str = "the checkpoint") -> None:
    """Put `optimizer_snapshot`'s (tensors, meta) back into a freshly built optimizer of the same kind."""
    state: dict[str, Any] = {}
    entries = {**schema.unprefixed(prefix, tensors), **(meta.get(schema.OPTIMIZER_SCALARS) or {})}
    for name, value in entries.items():
        *path, key = name.split("/")
        node = state
        for part in path:
            node = node.setdefault(part, {})
        node[key] = value
    per_param = {int(index): values for index, values in state.items()}
    load_optimizer_state(optimizer, {"state": per_param, "param_groups": meta[schema.OPTIMIZER_PARAM_GROUPS]},
                         where)


def _flatten_state(name: str, value: Any, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, entry in value.items():
            _flatten_state(f"{name}/{key}", entry, tensors, scalars)
    elif torch.is_tensor(value):
        tensors[name] = value
    else:
        scalars[name] = _plain(value)


def code_fingerprint() -> str:
    """The package version plus the git commit when running from a checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_PACKAGE_DIR,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def data_fingerprint(images: torch.Tensor, captions: list[list[str]]) -> str:
    digest = hashlib.blake2b(images.numpy().tobytes(), digest_size=16)
    digest.update("\x00".join("\x01".join(c) for c in captions).encode())
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """JSON-ready copy: tuples become lists, numpy scalars become Python numbers."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
