"""A `.parquet` file (or a glob of them) with an `image` column of bytes and a `text` column."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import PurePosixPath

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from stablediff.data.sources.base import (
    CaptionPolicy,
    RawSample,
    Source,
    SourceError,
    read_error_sample,
    with_retry,
)
from stablediff.data.sources.tabular import IMAGE_COLUMN, TableRows, pick_columns

# Rows per read: bounds memory to a few batches of encoded images at a time.
BATCH_ROWS = 64


def resolve_files(spec: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, path = fsspec.core.url_to_fs(spec)
    if any(ch in path for ch in "*?["):
        files = sorted(fs.glob(path))
        if not files:
            raise SourceError(f"no parquet files match {spec}")
        return fs, files
    if not fs.isfile(path):
        raise SourceError(f"{spec} does not exist")
    return fs, [path]


class ParquetSource(Source):
    """Samples from the rows of one or more parquet files, in file and row order."""

    def __init__(self, spec: str, caption_policy: CaptionPolicy = "error", allow_outside_paths: bool = False) -> None:
        self.spec = spec
        self.caption_policy = caption_policy
        self.allow_outside_paths = allow_outside_paths
        self.fs, self.files = resolve_files(spec)

    def __iter__(self) -> Iterator[RawSample]:
        for file in self.files:
            yield from self._file_samples(file)

    def _file_samples(self, file: str) -> Iterator[RawSample]:
        rows = TableRows(self.fs, file, str(PurePosixPath(file).parent), self.caption_policy,
                         self.allow_outside_paths)
        try:
            with with_retry(lambda: self.fs.open(file, "rb"), file) as handle:
                parquet = pq.ParquetFile(handle)
                schema = parquet.schema_arrow
                key, caption = pick_columns(schema, file)
                columns = [name for name in (IMAGE_COLUMN, key, caption) if name]
                batches = parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)
                yield from rows.samples(batches, schema)
        except (OSError, pa.ArrowException) as exc:
            # A corrupt page ends this file, not the run: the rows before it are kept.
            yield read_error_sample(file, f"{file}#row={rows.row}", exc)
