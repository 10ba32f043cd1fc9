"""Model outputs that appear whole or not at all: single files and diffusers folders.

- A single file is committed by `stablediff.io.atomic.replace_atomic`
  (temp name, fsync, rename, directory fsync): the one durable-write routine.
- A folder is written into a temp sibling (`NAME.tmp-PID-RANDOM`, the store's
  temp naming), every file and directory in it is fsynced, and it is renamed
  into place. Over an existing folder (`--force`, a run's re-export) the two
  are swapped by one `renameat2(RENAME_EXCHANGE)`, so at every instant OUT is
  the old folder or the new one, never a mix; the old one is deleted after.
- A SIGKILL leaves at most a temp sibling, which no loader takes for a model.
  The next write to the same OUT removes such leftovers (those of dead
  processes, and the hidden `.NAME.XXXX.tmp` files older versions left).
- A failed write (full disk, I/O error) raises `ExportWriteError`, one
  paragraph that says OUT was not replaced; the temp sibling is removed.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from stablediff.io.atomic import TEMP_MARKER, fsync_path, replace_atomic, temp_name
from stablediff.errors import PathExistsError, UserError
from stablediff.models.export_record import write_record
from stablediff.models.quiet import quiet_hf_libraries

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_LEFTOVER = re.compile(re.escape(TEMP_MARKER) + r"(\d+)-[0-9a-f]+$")
_OS_ERROR_CODE = re.compile(r"os error (\d+)")  # how safetensors' Rust I/O errors name errno


class ExportWriteError(UserError, OSError):
    """Writing a model output failed; nothing at OUT was replaced. The message is for the user."""


def clean_leftovers(out: Path) -> list[Path]:
    """Remove what killed writes to `out` left next to it; returns what was removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    removed = []
    for sibling in out.parent.iterdir():
        if _is_leftover_of(sibling.name, out.name):
            _remove_tree(sibling)
            removed.append(sibling)
    return removed


def _is_leftover_of(name: str, out_name: str) -> bool:
    if name.startswith(f".{out_name}.") and name.endswith(".tmp"):  # mkstemp temps of older versions
        return True
    match = _LEFTOVER.search(name)
    if not match or name[: match.start()] != out_name:
        return False
    return not _pid_alive(int(match.group(1)))  # a live process may be writing it right now


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier failed attempt in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_file(out: Path, data: bytes | memoryview) -> Path:
    """`data` as the file `out`, atomically and durably (an existing file is replaced at the rename)."""
    out = Path(out)
    clean_leftovers(out)
    existed = out.exists()
    try:
        replace_atomic(out, data)
    except OSError as exc:
        raise write_error(out, exc, existed) from None
    return out


@contextmanager
def folder(out: Path, replace: bool) -> Iterator[Path]:
    """Yield a temp sibling to fill; on success it becomes `out` (swapped with the old one if `replace`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    existed = out.exists()
    if existed and not replace:
        raise PathExistsError(f"{out} already exists; choose another output path or pass --force to replace it")
    tmp = Path(temp_name(str(out)))
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _commit_folder(tmp, out, existed)
    except BaseException as exc:
        _remove_tree(tmp)
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
            raise write_error(out, exc, existed) from None
        raise
    _remove_tree(tmp)  # after a swap: the old folder


def save_folder(write: Callable[[Path], None], out: Path, replace: bool, step: int | None = None,
                weights: str = "ema") -> Path:
    """`write(tmp)` fills the folder, which then becomes `out`; `step` is recorded (models/export_record.py)."""
    with folder(out, replace) as tmp:
        with quiet_hf_libraries():  # no "Writing model shards" bars from transformers' save_pretrained
            write(tmp)
        if step is not None:
            write_record(tmp, step, weights)
    return Path(out)


def save_pipeline_folder(pipe, out: Path, replace: bool, step: int | None = None, weights: str = "ema") -> Path:
    """A diffusers pipeline as the folder `out` (safetensors weights), atomically."""
    return save_folder(lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True), out, replace, step, weights)


def _commit_folder(tmp: Path, out: Path, existed: bool) -> None:
    if not existed:
        os.rename(tmp, out)  # fails rather than merge if `out` appeared meanwhile as a non-empty folder
    elif not _exchange(tmp, out):
        # No atomic swap here (not Linux, or a filesystem without it): move the old one aside first.
        aside = Path(temp_name(str(out)))
        os.rename(out, aside)
        os.rename(tmp, out)
        os.rename(aside, tmp)
    fsync_path(out.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot exchange
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_tree(root: Path) -> None:
    """save_pretrained does not fsync: make every file, then every directory, durable before the rename."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def write_error(out: Path, exc: BaseException, existed: bool) -> ExportWriteError:
    """One paragraph for a failed write: what, why (errno in words), and that nothing was replaced."""
    code = getattr(exc, "errno", None)
    if code is None:
        found = _OS_ERROR_CODE.search(str(exc))
        code = int(found.group(1)) if found else None
    reason = f"{os.strerror(code)} (errno {code})" if code else str(exc)
    kept = f"{out} is as it was" if existed else f"no {out} was created"
    hint = "free some space and run the command again" if code in (28, 27, 122) else "fix that and run it again"
    error = ExportWriteError(f"could not write {out}: {reason}. Nothing was replaced: {kept}, and the partial "
                             f"output was removed; {hint}.")
    error.errno = code
    return error
