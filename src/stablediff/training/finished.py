"""A run started again after it reached train.max_steps: nothing to train; re-export only when needed.

The export is redone only when it is missing, incomplete, or older than the
checkpoint it would be made from (e.g. a run killed during its final export, or
an export deleted by hand); otherwise the run says it is complete and stops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from stablediff.checkpoint import CheckpointStore
from stablediff.run_schema import EARLY_STOPPING, UNET_STAGE, stage_of
from stablediff.models.export_record import exported_step

# Files that a whole export holds (diffusers writes model_index.json; the pixel export has no VAE).
DIFFUSERS_FILES = ("model_index.json", "unet/diffusion_pytorch_model.safetensors",
                   "vae/diffusion_pytorch_model.safetensors")
PIXEL_FILES = ("unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json")


def completed_step(resume, max_steps: int) -> int | None:
    """The step of a resumed stage-2 checkpoint that already reached `max_steps` or stopped early, else None."""
    if resume is None or stage_of(resume.meta) != UNET_STAGE:
        return None
    stopped = (resume.meta.get(EARLY_STOPPING) or {}).get("stopped_at") is not None
    return resume.step if stopped or resume.step >= max_steps else None


def outputs_up_to_date(step: int, export_dir: Path, final_grid: Path, store_dir: Path, pixel: bool,
                       say: Callable[[str], None]) -> bool:
    """Say that the run is complete; True when its export and final sample grid need no redoing."""
    required = PIXEL_FILES if pixel else DIFFUSERS_FILES
    manifest = store_dir / CheckpointStore.manifest_rel(step)
    if not export_is_current(export_dir, manifest, required, step):
        say(f"run already complete at step {step}; exporting again: {stale_reason(export_dir, required)}")
        return False
    if not final_grid.is_file() or final_grid.stat().st_mtime < manifest.stat().st_mtime:
        say(f"run already complete at step {step}; its export is up to date, writing the final sample grid")
        return False
    say(f"run already complete at step {step}: the export in {export_dir} is up to date, nothing to do")
    return True


def export_is_current(export_dir: Path, manifest: Path, required: tuple[str, ...], step: int) -> bool:
    """Every required file of the export is there, and it holds `step`: by its export record (the one
    `generate RUN_DIR` reads too), or for an export without one, no file older than `manifest`."""
    if not manifest.is_file() or not all((export_dir / name).is_file() for name in required):
        return False
    recorded = exported_step(export_dir)
    if recorded is not None:
        return recorded >= step
    oldest = min(path.stat().st_mtime for path in export_dir.rglob("*") if path.is_file())
    return oldest >= manifest.stat().st_mtime


def stale_reason(export_dir: Path, required: tuple[str, ...]) -> str:
    if not all((export_dir / name).is_file() for name in required):
        return "the export is missing or incomplete"
    return "the export is older than the newest checkpoint"
