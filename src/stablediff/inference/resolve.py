"""MODEL on the command line or in `load_pipeline`: what it is, how to load it, what it is called.

- a diffusers pipeline folder (model_index.json);
- a single `.safetensors` (or, with trust_pickle, `.ckpt`) file in the original SD layout;
- a run directory: its `export/diffusers` folder while that holds the newest
  checkpoint, else a checkpoint from its store: when `step` or `best` is given,
  when nothing was exported yet, or when the export is older than the newest
  checkpoint (a failed final export, a resumed run); `note` then says why.

The model hash written into PNG metadata is A1111's AutoV2 of one file: the
single file itself, or for a diffusers folder the UNet's weights file (the
part that makes a model this model; VAE and text encoder are often shared).
A checkpoint loaded from a run's store has no such file; its hash is that of
the UNet's weights serialized as safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stablediff.errors import MissingPathError, ModelFileError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "folder", "single_file" or "run"
    path: Path  # resolved
    name: str  # the infotext's "Model"
    step: int | None = None
    best: bool = False
    note: str | None = None  # for the user: why a run's export was not used

    def weights_file(self) -> Path | None:
        if self.kind == "single_file":
            return self.path
        if self.kind == "folder":
            unet = self.path / "unet"
            candidates = sorted(unet.glob("*.safetensors")) + sorted(unet.glob("*.bin"))
            return candidates[0] if candidates else None
        return None

    def cache_key(self) -> tuple:
        """Changes when the weights on disk change, so a re-exported model is loaded again."""
        watched = self.weights_file() or self.path / "checkpoints" / "manifests"
        mtime = watched.stat().st_mtime_ns if watched.exists() else 0
        return self.kind, str(self.path), self.step, self.best, mtime


def resolve_model(model: str | Path, step: int | None = None, best: bool = False) -> ModelSource:
    path = Path(model).expanduser()
    if not path.exists():
        raise MissingPathError(f"model {path} does not exist; give a run directory, a diffusers pipeline folder "
                               "or a single-file .safetensors model")
    path = path.resolve()
    if step is not None or best:
        if not _is_run_dir(path):
            raise ModelFileError(f"--step/--best pick a checkpoint of a run directory, and {path} is not one "
                                 "(no checkpoints/ or config.yaml)")
        return ModelSource("run", path, path.name, step, best)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelFileError(f"model {path} is a {path.suffix or 'suffix-less'} file; a single-file model is a "
                                 ".safetensors (or, with --trust-pickle, .ckpt) file")
        return ModelSource("single_file", path, path.stem)
    if (path / "model_index.json").is_file():
        return ModelSource("folder", path, _folder_name(path))
    if (path / "export" / "diffusers" / "model_index.json").is_file():
        stale = stale_export(path, path / "export" / "diffusers")
        if stale is None:
            return ModelSource("folder", path / "export" / "diffusers", path.name)
        return ModelSource("run", path, path.name, note=stale)
    if (path / "checkpoints").is_dir():
        return ModelSource("run", path, path.name)
    raise ModelFileError(f"{path} is neither a diffusers pipeline folder (model_index.json) nor a run directory "
                         "with export/diffusers or checkpoints/; train one with `stablediff demo` or `stablediff train`")


def stale_export(run: Path, export: Path) -> str | None:
    """Why `export` is older than the run's newest checkpoint, or None when it holds that step."""
    from stablediff.checkpoint import CheckpointStore
    from stablediff.models.export_record import exported_step

    if not (run / "checkpoints" / "manifests").is_dir():
        return None
    steps = CheckpointStore(run / "checkpoints").steps()
    if not steps:
        return None
    newest, step = steps[-1], exported_step(export)
    if step is None:  # an export from before the step was recorded: compare times instead
        manifest = run / "checkpoints" / CheckpointStore.manifest_rel(newest)
        if manifest.stat().st_mtime <= (export / "model_index.json").stat().st_mtime:
            return None
        made = "was written before"
    elif step >= newest:
        return None
    else:
        made = f"holds step {step}, older than"
    return (f"{export} {made} the run's newest checkpoint (step {newest}), so that checkpoint is used instead; "
            f"`stablediff ckpt export {run} --format diffusers --out {export} --force` updates the export")


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "checkpoints").is_dir() or (path / "config.yaml").is_file())


def _folder_name(folder: Path) -> str:
    # RUN_DIR/export/diffusers is better known by its run's name.
    if folder.name == "diffusers" and folder.parent.name == "export":
        return folder.parent.parent.name
    return folder.name


def load_source(source: ModelSource, trust_pickle: bool = False):
    """A StableDiffusionPipeline, built by the loader for the source's kind (imported only when needed)."""
    if source.kind == "folder":
        from stablediff.models.pipeline_assembly import load_pipeline_folder

        pipe = load_pipeline_folder(source.path, trust_pickle)
    elif source.kind == "single_file":
        from stablediff.models.single_file_pipeline import load_single_file_pipeline

        pipe = load_single_file_pipeline(source.path, trust_pickle)
    else:
        from stablediff.models.run_export import pipeline_from_run

        pipe = pipeline_from_run(source.path, step=source.step, best=source.best, trust_pickle=trust_pickle)
    return pipe


def model_hash(source: ModelSource, pipe) -> str:
    from stablediff.inference.metadata import bytes_short_hash, file_short_hash

    weights = source.weights_file()
    if weights is not None:
        return file_short_hash(weights)
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in pipe.unet.state_dict().items()}
    return bytes_short_hash(save(state))
