"""Durable local writes: a file appears whole or not at all, and survives a power loss.

A write goes to `<final name>.tmp-<pid>-<random>`, is fsynced, renamed over the
final name, and the directory is fsynced (without the directory fsync a renamed
file can vanish after a power loss). This is the one implementation: the
checkpoint store, the feature cache, run files and model exports all use it.
"""

from __future__ import annotations

import os
import uuid

# Readers skip any name containing this marker, and `gc` removes the ones a crash left behind.
TEMP_MARKER = ".tmp-"


def temp_name(final: str) -> str:
    return f"{final}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_temp(name: str) -> bool:
    return TEMP_MARKER in name


def make_dirs(path: str | os.PathLike) -> None:
    """Create `path` and its missing parents, fsyncing each new directory's entry in its parent."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        make_dirs(parent)
    os.makedirs(path, exist_ok=True)
    _fsync_dir(parent)


def write_atomic(path: str | os.PathLike, data: memoryview | bytes, *, sync_dir: bool = True) -> None:
    """Write `data` to `path` through a fsynced temp sibling and a rename; the directory must exist.

    `sync_dir=False` leaves the directory fsync to the caller (the store syncs a
    whole save's chunk directories at once, before it writes the manifest).
    """
    final = os.fspath(path)
    tmp = temp_name(final)
    fd = _create(tmp)
    try:
        view = memoryview(data).cast("B")
        while view:
            written = os.write(fd, view)
            view = view[written:]
        _fsync_file(fd, tmp)
    except BaseException:
        os.close(fd)
        remove_quietly(tmp)
        raise
    os.close(fd)
    _rename(tmp, final)
    if sync_dir:
        _fsync_dir(os.path.dirname(os.path.abspath(final)))


def replace_atomic(path: str | os.PathLike, data: bytes) -> None:
    """`write_atomic`, creating the parent directory (durably) first if it is missing."""
    make_dirs(os.path.dirname(os.path.abspath(os.fspath(path))))
    write_atomic(path, data)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory by its path: what writers of whole folders (exports) make durable."""
    _fsync_dir(os.fspath(path))


def fsync_dirs(paths: set[str]) -> None:
    """Make earlier renames into these directories durable."""
    for path in sorted(paths):
        _fsync_dir(path)


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# The steps of a commit, as named functions so that a test can record their order
# (tests/checkpoint/test_commit_order.py).
def _create(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)


def _fsync_file(fd: int, path: str) -> None:
    os.fsync(fd)


def _rename(src: str, dst: str) -> None:
    os.replace(src, dst)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
