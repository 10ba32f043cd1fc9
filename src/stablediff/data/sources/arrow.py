"""A Hugging Face `datasets` folder written by `save_to_disk`, read with pyarrow alone.

The layout is `state.json` (listing the `data-XXXXX-of-NNNNN.arrow` files, in
Arrow's streaming IPC format) plus `dataset_info.json`; a `DatasetDict` adds
`dataset_dict.json` and one such folder per split. The `datasets` package is
not needed to read it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import fsspec
import pyarrow as pa

from stablediff.data.sources.base import (
    CaptionPolicy,
    RawSample,
    Source,
    SourceError,
    read_bytes,
    read_error_sample,
    with_retry,
)
from stablediff.data.sources.tabular import TableRows

DEFAULT_SPLIT = "train"


def split_folder(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """The folder of the split to read: the dataset itself, or `train` of a DatasetDict."""
    if fs.isfile(f"{root}/state.json"):
        return root
    splits = json.loads(read_bytes(fs, f"{root}/dataset_dict.json")).get("splits", [])
    if not splits:
        raise SourceError(f"{root}/dataset_dict.json lists no splits")
    split = DEFAULT_SPLIT if DEFAULT_SPLIT in splits else splits[0]
    return f"{root}/{split}"


def arrow_files(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    try:
        state = json.loads(read_bytes(fs, f"{folder}/state.json"))
        files = [entry["filename"] for entry in state["_data_files"]]
    except (FileNotFoundError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{folder}/state.json is not a `datasets` state file ({exc}); "
                          "was the folder written by Dataset.save_to_disk?") from exc
    return [f"{folder}/{name}" for name in files]


def record_batches(handle) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """`datasets` writes the streaming format; accept the random-access file format too."""
    try:
        reader = pa.ipc.open_stream(handle)
    except pa.ArrowInvalid:
        handle.seek(0)
        file_reader = pa.ipc.open_file(handle)
        batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        return file_reader.schema, batches
    return reader.schema, iter(reader)


class SavedDatasetSource(Source):
    """Samples from a `save_to_disk` folder (its `train` split for a DatasetDict)."""

    def __init__(self, spec: str, caption_policy: CaptionPolicy = "error", allow_outside_paths: bool = False) -> None:
        self.spec = spec
        self.caption_policy = caption_policy
        self.allow_outside_paths = allow_outside_paths
        self.fs, root = fsspec.core.url_to_fs(spec)
        self.folder = split_folder(self.fs, root.rstrip("/"))
        self.files = arrow_files(self.fs, self.folder)

    def __iter__(self) -> Iterator[RawSample]:
        for file in self.files:
            rows = TableRows(self.fs, file, self.folder, self.caption_policy, self.allow_outside_paths)
            try:
                with with_retry(lambda file=file: self.fs.open(file, "rb"), file) as handle:
                    schema, batches = record_batches(handle)
                    yield from rows.samples(batches, schema)
            except (OSError, pa.ArrowException) as exc:
                yield read_error_sample(file, f"{file}#row={rows.row}", exc)
