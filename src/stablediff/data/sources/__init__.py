"""Data sources: one module per on-disk format, one interface (`Source` yields `RawSample`).

`open_source(spec)` picks the format from the spec:

- `builtin:digits` (or `builtin:digits:held_out`), with a selector such as `?digits=9&count=20` (see `builtin.py`)
- a `.tar` / `.tar.gz` shard, a glob or a `{000..009}` brace pattern of them (webdataset)
- a `.parquet` file or a glob of them
- a folder written by `datasets`' `save_to_disk` (has `state.json` or `dataset_dict.json`)
- a folder with `metadata.jsonl` or `metadata.csv` (`file_name`, `text`)
- any other folder: images with same-stem `.txt` / `.caption` files

Paths may be fsspec URLs (`s3://...`, `memory://...`).
"""

from __future__ import annotations

import fsspec

from stablediff.data.sources.base import (
    CAPTION_POLICIES,
    CaptionPolicy,
    RawSample,
    Source,
    SourceError,
    check_policy,
    decode_caption,
    is_saved_dataset,
    with_retry,
)
from stablediff.data.sources.builtin import BUILTIN_PREFIX, DigitsSource
from stablediff.data.sources.folder import FolderSource
from stablediff.data.sources.metadata import MetadataSource, find_metadata
from stablediff.data.sources.tar import SHARD_SUFFIXES, TarSource

__all__ = [
    "CAPTION_POLICIES", "CaptionPolicy", "DigitsSource", "FolderSource", "MetadataSource",
    "ParquetSource", "RawSample", "SavedDatasetSource", "Source", "SourceError", "TarSource",
    "decode_caption", "open_source", "with_retry",
]

ACCEPTED = ("a folder of images with .txt/.caption files, a folder with metadata.jsonl or "
            "metadata.csv, a .tar shard or a glob of them, a .parquet file, a folder saved "
            "with datasets' save_to_disk, or builtin:digits")


def __getattr__(name: str):
    # The table formats need pyarrow; importing it only when they are used keeps
    # folders and shards working without it.
    if name == "ParquetSource":
        from stablediff.data.sources.parquet import ParquetSource
        return ParquetSource
    if name == "SavedDatasetSource":
        from stablediff.data.sources.arrow import SavedDatasetSource
        return SavedDatasetSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def table_source(class_name: str, spec: str, policy: CaptionPolicy, allow_outside_paths: bool = False) -> Source:
    try:
        source_class = __getattr__(class_name)
    except ModuleNotFoundError as exc:
        if exc.name != "pyarrow":
            raise
        raise SourceError(f"reading {spec} needs pyarrow, which is not installed; "
                          "install it with `pip install pyarrow`") from exc
    return source_class(spec, policy, allow_outside_paths)


def open_source(spec: str, caption_policy: str = "error", allow_outside_paths: bool = False) -> Source:
    """The source a spec names; raises `SourceError` if it does not exist or is no known format.

    `caption_policy` says what a sample without a caption becomes: `error` (a
    `missing_caption` reject), `empty` (caption ""), or `filename` (the file
    stem, with `_` and `-` read as spaces). `allow_outside_paths` lets a table's
    image paths leave the dataset's folder (else they are `outside_root` rejects).
    """
    policy = check_policy(caption_policy)
    if spec.startswith(BUILTIN_PREFIX):
        return DigitsSource(spec)
    fs, path = fsspec.core.url_to_fs(spec)
    if any(ch in path for ch in "*?[{"):
        return _file_source(spec, policy, allow_outside_paths) or _not_a_source(
            f"the pattern {spec} must end in .tar or .parquet; a data source is {ACCEPTED}")
    if not fs.exists(path):
        raise SourceError(f"data source {spec} does not exist; check the path (data.source)")
    if fs.isdir(path):
        root = path.rstrip("/")
        if is_saved_dataset(fs, root):
            return table_source("SavedDatasetSource", spec, policy, allow_outside_paths)
        if find_metadata(fs, root) is not None:
            return MetadataSource(spec, policy, allow_outside_paths)
        return FolderSource(spec, policy)
    return _file_source(spec, policy, allow_outside_paths) or _not_a_source(
        f"{spec} is not a data source stablediff can read; a data source is {ACCEPTED}")


def _file_source(spec: str, policy: CaptionPolicy, allow_outside_paths: bool = False) -> Source | None:
    """Tar shards and parquet files, by their suffix (one file or a pattern of them)."""
    lowered = spec.lower()
    if lowered.endswith(SHARD_SUFFIXES):
        return TarSource(spec, policy)
    if lowered.endswith(".parquet"):
        return table_source("ParquetSource", spec, policy, allow_outside_paths)
    return None


def _not_a_source(message: str) -> Source:
    raise SourceError(message)
