"""MODEL on the command line or in `load_pipeline`: what it is, how to load it, what it is called.

- a diffusers pipeline folder (model_index.json);
- a single `.safetensors` (or, with trust_pickle, `.ckpt`) file in the original SD layout;
- a run directory: its `export/diffusers` folder, or a checkpoint from its store
  when `step` or `best` is given (or when nothing was exported yet).

The model hash written into PNG metadata is A1111's AutoV2 of one file: the
single file itself, or for a diffusers folder the UNet's weights file (the
part that makes a model this model; VAE and text encoder are often shared).
A checkpoint loaded from a run's store has no such file; its hash is that of
the UNet's weights serialized as safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "folder", "single_file" or "run"
    path: Path  # resolved
    name: str  # the infotext's "Model"
    step: int | None = None
    best: bool = False

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
        raise FileNotFoundError(f"model {path} does not exist; give a run directory, a diffusers pipeline folder "
                                "or a single-file .safetensors model")
    path = path.resolve()
    if step is not None or best:
        if not _is_run_dir(path):
            raise ValueError(f"--step/--best pick a checkpoint of a run directory, and {path} is not one "
                             "(no checkpoints/ or config.yaml)")
        return ModelSource("run", path, path.name, step, best)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ValueError(f"model {path} is a {path.suffix or 'suffix-less'} file; a single-file model is a "
                             ".safetensors (or, with --trust-pickle, .ckpt) file")
        return ModelSource("single_file", path, path.stem)
    if (path / "model_index.json").is_file():
        return ModelSource("folder", path, _folder_name(path))
    if (path / "export" / "diffusers" / "model_index.json").is_file():
        return ModelSource("folder", path / "export" / "diffusers", path.name)
    if (path / "checkpoints").is_dir():
        return ModelSource("run", path, path.name)
    raise ValueError(f"{path} is neither a diffusers pipeline folder (model_index.json) nor a run directory "
                     "with export/diffusers or checkpoints/; train one with `stablediff demo` or `stablediff train`")


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
        from stablediff.inference.pipeline import load_pipeline_folder

        pipe = load_pipeline_folder(source.path, trust_pickle)
    elif source.kind == "single_file":
        from stablediff.models.single_file import load_single_file_pipeline

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
