"""Small files of a run directory that must survive a crash: JSON-lines logs (rewrites: io.atomic).

`metrics.jsonl`, `quarantine.jsonl` and `config.yaml` are appended or rewritten
while a run may be killed at any instant. A rewrite goes to a temporary sibling
that is fsynced and renamed over the file (then the directory is fsynced), so a
reader sees the old file or the new one, never half of each. A SIGKILL during
an append can leave a torn last line; readers skip it and the next writer cuts
it off before appending, so it is never glued to the next record.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_lines(path: Path) -> list[tuple[bytes, dict | None]]:
    """Every complete line of a JSON-lines file with its record (None where it does not parse).

    A last line without its newline is a torn append and is left out.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
        lines.pop()
    return [(line, _parse(line)) for line in lines]


def _parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def cut_torn_tail(path: Path) -> None:
    """Truncate a torn last line (a killed append) so the next append starts on a line of its own."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with path.open("rb+") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        data = handle.read()
        handle.truncate(data.rfind(b"\n") + 1)


EVAL_FILE = "eval.json"  # RUN_DIR/eval.json: the "best" mark that export, generate and early stopping read


def read_eval(run_dir: Path) -> dict:
    """RUN_DIR/eval.json as a dict ({} when missing or unreadable: the mark is then recomputed)."""
    try:
        data = json.loads((Path(run_dir) / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_eval(run_dir: Path, **entries) -> None:
    """Set top-level entries of RUN_DIR/eval.json, atomically (a reader sees the old file or the new one)."""
    from stablediff.io.atomic import replace_atomic

    data = {**read_eval(run_dir), **entries}
    replace_atomic(Path(run_dir) / EVAL_FILE, (json.dumps(data, indent=2) + "\n").encode())
