"""Durable file primitives for a checkpoint store: local disk or any fsspec filesystem.

The store talks to one small interface (`StoreFS`). On a local disk it uses
`stablediff.io.atomic` (the one durable-write implementation) so that it can
fsync files *and directories* — fsspec has no directory fsync, and without it
a renamed file can vanish after a power loss. On other filesystems it writes a temporary object and moves it into place,
which is as much as fsspec allows (object stores make a PUT atomic anyway).
"""

from __future__ import annotations

import abc
import errno
import math
import os
import posixpath
from typing import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from stablediff.io import atomic
from stablediff.io.atomic import temp_name


class StoreFS(abc.ABC):
    """Paths are relative to the store root and always use '/'."""

    location: str

    @abc.abstractmethod
    def write_atomic(self, rel: str, data: memoryview | bytes, *, sync_dir: bool = True) -> None:
        """Write under a temp name, make it durable, rename into place (and fsync the dir)."""

    def sync_dirs(self, rels: set[str]) -> None:
        """Make earlier renames into these directories durable (where the filesystem can)."""

    @abc.abstractmethod
    def read_into(self, rel: str, out: memoryview) -> int:
        """Fill `out` from the file; return the file's real size (may differ from len(out))."""

    @abc.abstractmethod
    def read(self, rel: str) -> bytes: ...

    @abc.abstractmethod
    def size(self, rel: str) -> int | None: ...

    @abc.abstractmethod
    def list_files(self, rel_dir: str) -> list[str]:
        """Names (not paths) of the files directly in `rel_dir`; [] if it does not exist."""

    @abc.abstractmethod
    def walk_files(self, rel_dir: str) -> Iterator[tuple[str, int, float]]:
        """(relative path, size, mtime) of every file below `rel_dir`."""

    @abc.abstractmethod
    def remove(self, rel: str) -> None:
        """Delete the file; a file that is already gone is not an error."""

    def touch(self, rel: str) -> bool:
        """Set the file's mtime to now (gc's grace counts from a chunk's last use);
        False if the file is gone. Where the filesystem cannot, it does nothing."""
        return True


class LocalFS(StoreFS):
    """A local directory, through `os`, with real file and directory fsyncs."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.location = self.root

    def _abs(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/")) if rel else self.root

    def write_atomic(self, rel: str, data: memoryview | bytes, *, sync_dir: bool = True) -> None:
        # One stat per write: a directory removed behind our back is simply made again.
        atomic.make_dirs(self._abs(posixpath.dirname(rel)))
        atomic.write_atomic(self._abs(rel), data, sync_dir=sync_dir)

    def sync_dirs(self, rels: set[str]) -> None:
        atomic.fsync_dirs({self._abs(rel_dir) for rel_dir in rels})

    def read_into(self, rel: str, out: memoryview) -> int:
        with open(self._abs(rel), "rb", buffering=0) as f:
            actual = os.fstat(f.fileno()).st_size
            filled = 0
            while filled < len(out):
                n = f.readinto(out[filled:])
                if not n:
                    break
                filled += n
        return actual

    def read(self, rel: str) -> bytes:
        with open(self._abs(rel), "rb") as f:
            return f.read()

    def size(self, rel: str) -> int | None:
        try:
            return os.stat(self._abs(rel)).st_size
        except FileNotFoundError:
            return None

    def list_files(self, rel_dir: str) -> list[str]:
        try:
            with os.scandir(self._abs(rel_dir)) as entries:
                return [e.name for e in entries if e.is_file()]
        except FileNotFoundError:
            return []

    def walk_files(self, rel_dir: str) -> Iterator[tuple[str, int, float]]:
        base = self._abs(rel_dir)
        for dirpath, _dirs, files in os.walk(base):
            rel_base = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name in files:
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:  # removed while we walked
                    continue
                yield f"{rel_base}/{name}", st.st_size, st.st_mtime

    def remove(self, rel: str) -> None:
        atomic.remove_quietly(self._abs(rel))

    def touch(self, rel: str) -> bool:
        try:
            os.utime(self._abs(rel))
        except FileNotFoundError:
            return False
        return True


class FsspecFS(StoreFS):
    """Any other fsspec filesystem: temp object + move; durability is the backend's."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, location: str):
        self.fs = fs
        self.root = root.rstrip("/")
        self.location = location

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def write_atomic(self, rel: str, data: memoryview | bytes, *, sync_dir: bool = True) -> None:
        final = self._abs(rel)
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        tmp = temp_name(final)
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(memoryview(data).cast("B"))
            self.fs.mv(tmp, final)
        except BaseException:
            self._remove_quietly(tmp)
            raise

    def read_into(self, rel: str, out: memoryview) -> int:
        data = self.read(rel)
        n = min(len(data), len(out))
        out[:n] = data[:n]
        return len(data)

    def read(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self._abs(rel))
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError) and exc.errno == errno.ENOENT:
                raise FileNotFoundError(exc.errno, str(exc), self._abs(rel)) from exc
            raise

    def size(self, rel: str) -> int | None:
        try:
            info = self.fs.info(self._abs(rel))
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") == "file" else None

    def list_files(self, rel_dir: str) -> list[str]:
        try:
            entries = self.fs.ls(self._abs(rel_dir), detail=True)
        except FileNotFoundError:
            return []
        return [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "file"]

    def walk_files(self, rel_dir: str) -> Iterator[tuple[str, int, float]]:
        base = self._abs(rel_dir)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return
        strip = len(self.fs._strip_protocol(self.root).rstrip("/")) + 1
        for path, info in found.items():
            if info.get("type") != "file":
                continue
            yield path[strip:], int(info["size"]), _mtime(self.fs, path, info)

    def remove(self, rel: str) -> None:
        self._remove_quietly(self._abs(rel))

    def _remove_quietly(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass


def open_store_fs(location: str | os.PathLike, fs: fsspec.AbstractFileSystem | None = None) -> StoreFS:
    """Build the filesystem layer; does no I/O, so a broken replica cannot fail here."""
    location = os.fspath(location)
    if fs is None:
        fs, root = fsspec.core.url_to_fs(location)
    else:
        root = fs._strip_protocol(location)
        location = fs.unstrip_protocol(root)
    if isinstance(fs, LocalFileSystem):
        return LocalFS(root)
    return FsspecFS(fs, root, location)


def _mtime(fs: fsspec.AbstractFileSystem, path: str, info: dict) -> float:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return value.timestamp()
    try:
        return fs.modified(path).timestamp()
    except (NotImplementedError, OSError, AttributeError):
        # Unknown age counts as young: gc must never collect a chunk that a save in
        # flight may have just reused. Only gc's grace period reads this.
        return math.inf
