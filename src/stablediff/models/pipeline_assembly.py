"""A diffusers StableDiffusionPipeline from our components, or from a pipeline folder on disk.

Building, exporting and generating all end in one of these, so they sit with the
models: export (models/run_export.py), the single-file tools and inference use them.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from stablediff.errors import MissingPathError
from stablediff.models.quiet import quiet_hf_libraries
from stablediff.models.weights_guard import check_model_folder


def default_scheduler(training_scheduler_config: dict) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M), the fast sampler most users expect by default."""
    return DPMSolverMultistepScheduler.from_config(training_scheduler_config, algorithm_type="dpmsolver++")


def assemble_pipeline(vae, text_encoder, tokenizer, unet, training_scheduler_config: dict) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=default_scheduler(training_scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline_folder(path: str | Path, trust_pickle: bool = False) -> StableDiffusionPipeline:
    folder = Path(path).expanduser()
    if not (folder / "model_index.json").is_file():
        raise MissingPathError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json). Give the folder that "
            "`stablediff demo` or `stablediff ckpt export --format diffusers` wrote, e.g. RUN_DIR/export/diffusers."
        )
    check_model_folder(folder, trust_pickle)
    # Quiet: loading bars, and "expected CLIPTextModel" for our BERT text encoder, are noise to a user.
    with quiet_hf_libraries():
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
