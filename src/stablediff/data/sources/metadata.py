"""A folder indexed by `metadata.jsonl` or `metadata.csv` (Hugging Face `imagefolder` layout).

Each row names an image by `file_name` (relative to the metadata file, and inside
its folder unless `data.allow_outside_paths`: see `base.confined_path`) and
gives its caption in `text` (or `caption`). Images in the folder that no row
names are still yielded, with a missing caption, so they are reported rather
than silently ignored.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import PurePosixPath

import fsspec

from stablediff.data.sources.base import (
    CaptionPolicy,
    RawSample,
    Source,
    SourceError,
    classify,
    confined_path,
    decode_caption,
    outside_root_sample,
    read_bytes,
    read_error_sample,
    resource_fork_sample,
)
from stablediff.data.sources.folder import image_sample, list_files, stem_key

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_FIELDS = ("text", "caption")


def find_metadata(fs: fsspec.AbstractFileSystem, root: str) -> str | None:
    for name in METADATA_FILES:
        if fs.isfile(f"{root}/{name}"):
            return name
    return None


def parse_rows(name: str, text: str) -> list[dict | str]:
    """Rows of the index; a row that cannot be parsed is kept as its error message."""
    if name.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is None or "file_name" not in reader.fieldnames:
            raise SourceError(f"{name} has no `file_name` column; its header is "
                              f"{reader.fieldnames}. Add a header line `file_name,text`.")
        # A CSV cannot say "null": an empty cell is a missing value.
        return [{k: (v if v != "" else None) for k, v in row.items()} for row in reader]
    rows: list[dict | str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append(f"line {number}: not JSON ({exc.msg})")
            continue
        rows.append(row if isinstance(row, dict) else f"line {number}: not a JSON object")
    return rows


def row_caption(row: dict) -> str | None:
    for field in CAPTION_FIELDS:
        value = row.get(field)
        if value is not None:
            return value if isinstance(value, str) else json.dumps(value)
    return None


class MetadataSource(Source):
    """Images listed in `metadata.jsonl` / `metadata.csv` with `file_name` and `text`."""

    def __init__(self, spec: str, caption_policy: CaptionPolicy = "error", allow_outside_paths: bool = False) -> None:
        self.spec = spec
        self.caption_policy = caption_policy
        self.allow_outside_paths = allow_outside_paths
        self.fs, root = fsspec.core.url_to_fs(spec)
        self.root = root.rstrip("/")
        name = find_metadata(self.fs, self.root)
        if name is None:
            raise SourceError(f"{spec} has neither metadata.jsonl nor metadata.csv")
        self.metadata_name = name

    def __iter__(self) -> Iterator[RawSample]:
        # surrogateescape keeps non-UTF-8 bytes as lone surrogates, so one
        # Latin-1 caption becomes one `caption_not_utf8` reject, not a dead index.
        raw = read_bytes(self.fs, f"{self.root}/{self.metadata_name}")
        rows = parse_rows(self.metadata_name, raw.decode("utf-8-sig", errors="surrogateescape"))
        files = list_files(self.fs, self.root)  # one listing, not one stat per row
        present, listed = set(files), set()
        for row in rows:
            yield self._row_sample(row, present, listed)
        yield from self._unlisted(files, listed)

    def _row_sample(self, row: dict | str, present: set[str], listed: set[str]) -> RawSample:
        origin = f"{self.root}/{self.metadata_name}"
        if isinstance(row, str):
            return RawSample(row, b"", None, None, origin, reject="bad_metadata", detail=row)
        file_name = row.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            return RawSample(json.dumps(row)[:80], b"", None, None, origin, reject="bad_metadata",
                             detail="row has no file_name")
        file_name = file_name.removeprefix("./")
        stem = PurePosixPath(file_name).stem
        caption = decode_caption(row_caption(row), stem, self.caption_policy)
        inside = confined_path(self.root, file_name)
        if inside is None:
            return self._outside_sample(file_name, caption)
        file_name = inside[len(self.root) + 1:]  # `sub/../cat.png` is `cat.png`
        listed.add(file_name)
        if file_name not in present:
            return RawSample(stem_key(file_name), b"", None, None, f"{self.root}/{file_name}",
                             reject="missing_image",
                             detail=f"listed in {self.metadata_name} but not found")
        return image_sample(self.fs, self.root, file_name, caption)

    def _outside_sample(self, file_name: str, caption: tuple[str | None, str | None]) -> RawSample:
        """A row naming a file outside the folder: read only with data.allow_outside_paths."""
        key, origin = stem_key(file_name), f"{self.root}/{self.metadata_name}"
        path = confined_path(self.root, file_name, allow_outside=True)
        if not self.allow_outside_paths:
            return outside_root_sample(key, origin, file_name, self.root)
        try:
            data = read_bytes(self.fs, path)
        except OSError as exc:
            return read_error_sample(key, origin, exc)
        return RawSample(key, data, caption[0], caption[1], path)

    def _unlisted(self, files: list[str], listed: set[str]) -> Iterator[RawSample]:
        for relative in files:
            if relative in listed:
                continue
            kind = classify(relative)
            if kind == "resource_fork":
                yield resource_fork_sample(stem_key(relative), f"{self.root}/{relative}")
            elif kind == "image":
                caption = decode_caption(None, PurePosixPath(relative).stem, self.caption_policy)
                yield image_sample(self.fs, self.root, relative, caption)
