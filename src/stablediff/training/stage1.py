"""Stage 1 as a run does it: the autoencoder from a checkpoint, a pretrained folder, or trained here.

Training saves through the run's checkpoint store like stage 2 does: every
`checkpoint.every_steps` / `every_seconds` (skipping one that falls due while
the previous is still being written), on SIGTERM/SIGINT (then the run stops),
and once more when finished, with the VAE report and scaling factor,
so a finished stage 1 is never trained again. Its checkpoints are step 0 of the
store with meta stage "vae" (training/state.py); stage 2's own step 0 replaces
the last one. A stage 1 resumed from step k ends bitwise equal to one that was
never stopped: each step's batch and noise are drawn from (seed, step), and the
weights, AdamW's state and the RNG come back from the checkpoint.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from stablediff import run_schema as schema
from stablediff.config import RunConfig
from stablediff.errors import CheckpointError
from stablediff.models.build import build_vae, count_parameters
from stablediff.training import state as train_state
from stablediff.training.checkpointing import RunCheckpointer, open_stores
from stablediff.training.distributed import DistInfo
from stablediff.training.interrupt import STOP, TrainingInterrupted
from stablediff.training.metrics import MetricsLog
from stablediff.training.vae_stage import VAEReport, VAETrainState, make_vae_state, train_vae


@dataclass
class Stage1Saves:
    """Where and with what stage 1 saves: the run directory, and the meta every checkpoint carries."""

    run_dir: Path
    config_dump: dict
    fingerprints: dict = field(default_factory=dict)
    dist_info: DistInfo = field(default_factory=DistInfo)
    say: Callable[[str], None] = field(default=lambda message: print(message, file=sys.stderr, flush=True))


def vae_stage(config: RunConfig, images, held_out, resume, metrics: MetricsLog | None, trust_pickle: bool = False,
              saves: Stage1Saves | None = None):
    """(the frozen VAE, its report or None). `saves`: checkpoint stage 1 (None: never train, e.g. `data cache`)."""
    vae = build_vae(config.vae, config.data.resolution, trust_pickle)
    saved = resume.meta if resume is not None else None
    if saved is not None and (schema.stage_of(saved) == schema.UNET_STAGE or saved.get(schema.VAE_REPORT)):
        vae.load_state_dict(train_state.vae_weights(resume.tensors))
        vae.register_to_config(scaling_factor=saved[schema.VAE_SCALING_FACTOR])
        report = VAEReport(**saved["vae_report"]) if saved.get("vae_report") else None
        return vae.requires_grad_(False).eval(), report
    if config.vae.pretrained or config.vae.train_steps <= 0:
        return vae.requires_grad_(False).eval(), None
    if saves is None:
        raise CheckpointError(f"the run's autoencoder is not trained yet (stage 1 stopped at step "
                              f"{saved['vae_step'] if saved else 0} of {config.vae.train_steps}); "
                              "finish it with `stablediff train` first")
    report = train_and_save(config, vae, images, held_out, resume, metrics, saves)
    saves.say(f"autoencoder held-out reconstruction: MSE {report.held_out_mse:.4f}, "
              f"PSNR {report.held_out_psnr:.1f} dB")
    return vae.requires_grad_(False).eval(), report


def train_and_save(config: RunConfig, vae, images, held_out, resume, metrics: MetricsLog | None,
                   saves: Stage1Saves) -> VAEReport:
    state = make_vae_state(vae, config.vae)
    if resume is not None:
        train_state.restore_vae(state, resume.tensors, resume.meta)
    saves.say(f"stage 1: autoencoder, {count_parameters(vae) / 1e6:.2f}M parameters, "
              f"{config.vae.train_steps} steps" + (f", from step {state.step}" if state.step else ""))
    checkpointer = RunCheckpointer(*open_stores(saves.run_dir, config.checkpoint), config.checkpoint, saves.say,
                                   saves.dist_info)
    capture = partial(train_state.capture_vae, state, saves.config_dump, saves.fingerprints)
    try:
        log = metrics.write if metrics is not None else None
        report = train_vae(vae, images, held_out, config.vae, config.seed, log=log, state=state,
                           after_step=partial(after_vae_step, checkpointer, capture))
        finished = {schema.VAE_REPORT: asdict(report), schema.VAE_SCALING_FACTOR: report.scaling_factor}
        checkpointer.save(schema.VAE_CHECKPOINT_STEP, partial(capture, finished=finished))
    finally:
        checkpointer.close()  # waits: a finished stage 1 is committed before anything else starts
    if metrics is not None:
        metrics.write(stage="vae", held_out_mse=report.held_out_mse, held_out_psnr=report.held_out_psnr)
    return report


def after_vae_step(checkpointer: RunCheckpointer, capture, state: VAETrainState) -> None:
    """Stage 1's step boundary: the emergency save on a signal, else a scheduled save when due.

    A save that falls due while the previous one is still being written is skipped, not waited
    for: each stage-1 checkpoint replaces the one before, so the next one loses nothing. Local
    only (no collective): under torchrun rank 0 alone trains stage 1 while the others wait.
    """
    if STOP.signal_name is not None:
        checkpointer.emergency_save(schema.VAE_CHECKPOINT_STEP, capture,
                                    what=f"of stage 1 at its step {state.step}")
        raise TrainingInterrupted(STOP.signal_name, message=f"saved a checkpoint of stage 1 (autoencoder) at its "
                                                            f"step {state.step}; run the same command to continue")
    if checkpointer.due(state.step) and not checkpointer.busy():
        checkpointer.save(schema.VAE_CHECKPOINT_STEP, capture)

