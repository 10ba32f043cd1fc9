"""Rows of an Arrow table -> samples; shared by the parquet and `save_to_disk` sources.

The image column is `image`, holding the encoded bytes, a file path (relative
to the table's folder, and inside it unless `data.allow_outside_paths`), or, as
the Hugging Face `Image` feature stores them, a struct `{bytes, path}` (a row
with no bytes is read from `path`). The caption
is `text` or `caption`. String columns are read as raw bytes so that a caption
that is not valid UTF-8 is a `caption_not_utf8` reject, not a crash of the file.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import PurePosixPath

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from stablediff.data.sources.base import (
    CaptionPolicy,
    RawSample,
    SourceError,
    confined_path,
    decode_caption,
    outside_root_sample,
    read_bytes,
    read_error_sample,
)

IMAGE_COLUMN = "image"
CAPTION_COLUMNS = ("text", "caption")
KEY_COLUMNS = ("__key__", "key", "id")


def pick_columns(schema: pa.Schema, where: str) -> tuple[str | None, str | None]:
    """(key column, caption column); raises if there is no image column."""
    if IMAGE_COLUMN not in schema.names:
        raise SourceError(f"{where} has no `{IMAGE_COLUMN}` column (it has {schema.names}); "
                          "stablediff reads images from a column named `image`.")
    key = next((name for name in KEY_COLUMNS if name in schema.names), None)
    caption = next((name for name in CAPTION_COLUMNS if name in schema.names), None)
    return key, caption


def as_bytes_list(column: pa.Array) -> list:
    """A string column as raw bytes (no UTF-8 validation yet), anything else as Python values."""
    if pa.types.is_string(column.type):
        column = pc.cast(column, pa.binary())
    elif pa.types.is_large_string(column.type):
        column = pc.cast(column, pa.large_binary())
    return column.to_pylist()


class TableRows:
    """Turns record batches of one file into samples, keeping a running row number."""

    def __init__(self, fs: fsspec.AbstractFileSystem, file: str, base_dir: str,
                 caption_policy: CaptionPolicy, allow_outside_paths: bool = False) -> None:
        self.fs, self.file, self.base_dir = fs, file, base_dir
        self.caption_policy = caption_policy
        self.allow_outside_paths = allow_outside_paths
        self.row = 0

    def samples(self, batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> Iterator[RawSample]:
        key_column, caption_column = pick_columns(schema, self.file)
        for batch in batches:
            images = batch.column(IMAGE_COLUMN).to_pylist()
            captions = (as_bytes_list(batch.column(caption_column)) if caption_column
                        else [None] * batch.num_rows)
            keys = (as_bytes_list(batch.column(key_column)) if key_column
                    else [None] * batch.num_rows)
            for image, caption, key in zip(images, captions, keys, strict=True):
                yield self._sample(image, caption, key)
                self.row += 1

    def _sample(self, image: object, caption: bytes | None, key: object) -> RawSample:
        origin = f"{self.file}#row={self.row}"
        if isinstance(image, dict):
            path, data = image.get("path"), image.get("bytes")
        elif isinstance(image, str):  # a column of file paths instead of bytes
            path, data = image, None
        else:
            path, data = None, image
        key_text = self._key(key, path)
        if data is None and path:
            full_path = confined_path(self.base_dir, path, self.allow_outside_paths)
            if full_path is None:
                return outside_root_sample(key_text, origin, path, self.base_dir)
            try:
                data = read_bytes(self.fs, full_path)
            except OSError as exc:
                return read_error_sample(key_text, origin, exc)
        if data is None:
            return RawSample(key_text, b"", None, None, origin, reject="missing_image",
                             detail="the image cell is empty")
        text, error = decode_caption(caption, PurePosixPath(key_text).name, self.caption_policy)
        return RawSample(key_text, bytes(data), text, error, origin)

    def _key(self, key: object, path: str | None) -> str:
        if isinstance(key, bytes):
            return key.decode("utf-8", errors="replace")
        if key is not None:
            return str(key)
        if path:
            stem = PurePosixPath(path)
            return str(stem.with_suffix("")) if stem.suffix else path
        return f"{self.row:08d}"
