"""Checks of a command's inputs that need no model, made before any work: a typo costs no minutes.

`check_run_inputs` runs before the run directory is created and before torch,
diffusers or a model is imported, so a wrong `data.source` or a `--run-dir`
that is a file is reported at once, and nothing is left behind.
"""

from __future__ import annotations

from pathlib import Path

from stablediff.errors import UserError


def check_folder_target(path: Path, what: str) -> None:
    """`path` is a folder or can become one: neither it nor a parent is a file."""
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "it" if folder == path else f"its parent {folder}"
                raise UserError(f"{what} {path}: {where} is a file, not a folder; give a folder (it is created "
                                "if missing)")
            return


def check_run_inputs(config, run_dir: Path) -> None:
    """The run directory can be a folder and `data.source` (and `data.validation_source`) open: they exist,
    their format is known, a built-in selector is valid."""
    from stablediff.data.sources import SourceError, open_source

    check_folder_target(run_dir, "the run directory")
    sources = {"data.source": config.data.source, "data.validation_source": config.data.validation_source}
    for key, spec in sources.items():
        if spec is None:
            continue
        try:
            open_source(spec, config.data.caption_policy)  # cheap: finds files, reads none
        except SourceError as exc:
            raise UserError(f"{exc}. Nothing was started; fix {key} (in the config or with "
                            f"--set {key}=PATH)") from None
