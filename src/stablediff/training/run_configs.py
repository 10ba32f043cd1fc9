"""RUN_DIR/config.yaml is the resolved config in use; each earlier one is kept under RUN_DIR/configs/.

config.yaml opens with a comment naming the step it took effect at. When a
resume brings a different resolved config, the previous file is first copied to
`configs/step-N.yaml` (N: the step it took effect at), then config.yaml is
replaced atomically, so at every instant each config the run trained with is on
disk. The comment keeps the file loadable: `stablediff train RUN_DIR/config.yaml`.
"""

from __future__ import annotations

import re
from pathlib import Path

from stablediff.io.atomic import replace_atomic

CURRENT = "config.yaml"
ARCHIVE = "configs"
_HEADER = "# the resolved config of this run, in effect from step {step}\n"
_HEADER_RE = re.compile(r"\A# the resolved config of this run, in effect from step (\d+)\n")


def write_run_config(run_dir: Path, text: str, step: int, keep_previous: bool) -> Path | None:
    """Make `text` (the dumped config) the run's config.yaml from `step`; returns where the old one went.

    An unchanged config keeps its file (and the step it started at). `keep_previous`
    is false for a run that starts over without a checkpoint: the old file trained nothing.
    """
    current = run_dir / CURRENT
    archived = None
    if current.is_file():
        old = current.read_text()
        started, body = _split(old)
        if body == text:
            return None
        if keep_previous:
            archived = _free_name(run_dir / ARCHIVE, started)
            replace_atomic(archived, old.encode())
    replace_atomic(current, (_HEADER.format(step=step) + text).encode())
    return archived


def _split(content: str) -> tuple[int, str]:
    """(the step a config.yaml took effect at, its YAML without the header); 0 for files without one."""
    match = _HEADER_RE.match(content)
    return (int(match.group(1)), content[match.end():]) if match else (0, content)


def _free_name(directory: Path, step: int) -> Path:
    """configs/step-N.yaml, or step-N.2.yaml ... when a resume at the same step already left one."""
    candidate, n = directory / f"step-{step}.yaml", 1
    while candidate.exists():
        n += 1
        candidate = directory / f"step-{step}.{n}.yaml"
    return candidate
