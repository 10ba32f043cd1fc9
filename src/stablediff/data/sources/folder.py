"""A folder of images with same-stem caption files: `cat.jpg` + `cat.txt` (or `cat.caption`).

The kohya / EveryDream layout. The folder is walked recursively in sorted
order, so the sample order (and with it which of two duplicates is kept) does
not depend on the filesystem.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import PurePosixPath

import fsspec

from stablediff.data.sources.base import (
    CaptionPolicy,
    RawSample,
    Source,
    classify,
    decode_caption,
    read_bytes,
    read_error_sample,
    resource_fork_sample,
)

CAPTION_EXTENSIONS = ("txt", "caption")


def list_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Every file under `root`, as sorted POSIX paths relative to it."""
    root = root.rstrip("/")
    found = fs.find(root, withdirs=False)
    return sorted(path[len(root) + 1 :] for path in found if path.startswith(root + "/"))


def stem_key(relative: str) -> str:
    """`sub/cat.jpg` -> `sub/cat`: the sample's key and the caption file's stem."""
    path = PurePosixPath(relative)
    return str(path.with_suffix("")) if path.suffix else relative


def image_sample(fs: fsspec.AbstractFileSystem, root: str, relative: str,
                 caption: tuple[str | None, str | None]) -> RawSample:
    """Read one image's bytes; an unreadable file becomes a `read_error` reject."""
    key, origin = stem_key(relative), f"{root}/{relative}"
    try:
        data = read_bytes(fs, origin)
    except OSError as exc:
        return read_error_sample(key, origin, exc)
    return RawSample(key, data, caption[0], caption[1], origin)


class FolderSource(Source):
    """Images with same-stem `.txt`/`.caption` files, found recursively."""

    def __init__(self, spec: str, caption_policy: CaptionPolicy = "error") -> None:
        self.spec = spec
        self.caption_policy = caption_policy
        self.fs, self.root = fsspec.core.url_to_fs(spec)
        self.root = self.root.rstrip("/")

    def __iter__(self) -> Iterator[RawSample]:
        files = list_files(self.fs, self.root)
        present = set(files)
        for relative in files:
            kind = classify(relative)
            if kind == "resource_fork":
                yield resource_fork_sample(stem_key(relative), f"{self.root}/{relative}")
            elif kind == "image":
                yield image_sample(self.fs, self.root, relative, self._caption(relative, present))

    def _caption(self, relative: str, present: set[str]) -> tuple[str | None, str | None]:
        stem = stem_key(relative)
        for ext in CAPTION_EXTENSIONS:
            if f"{stem}.{ext}" in present:
                try:
                    raw = read_bytes(self.fs, f"{self.root}/{stem}.{ext}")
                except OSError:
                    raw = None  # an unreadable caption file counts as a missing caption
                return decode_caption(raw, PurePosixPath(stem).name, self.caption_policy)
        return decode_caption(None, PurePosixPath(stem).name, self.caption_policy)
