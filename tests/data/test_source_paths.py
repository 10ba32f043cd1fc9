"""Table sources read images only from inside the dataset's folder, unless data.allow_outside_paths."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stablediff.data.sources import open_source
from stablediff.data.sources.base import confined_path

from .corpus import encode


@pytest.mark.parametrize("path, inside", [
    ("cat.png", "/data/cat.png"), ("sub/../cat.png", "/data/cat.png"), ("./sub/cat.png", "/data/sub/cat.png"),
    ("../secret.png", None), ("sub/../../secret.png", None), ("/etc/passwd", None), ("C:\\secret.png", None),
    ("s3://bucket/secret.png", None), ("../data2/cat.png", None),
])
def test_confined_path_keeps_a_path_inside_the_root(path, inside):
    assert confined_path("/data", path) == inside


def test_confined_path_lets_anything_through_when_allowed():
    assert confined_path("/data", "../secret.png", allow_outside=True) == "/secret.png"
    assert confined_path("/data", "/etc/passwd", allow_outside=True) == "/etc/passwd"


def image_files(tmp_path: Path) -> tuple[Path, list[str]]:
    """A dataset folder with one image inside, and an image outside it named three ways."""
    root, outside = tmp_path / "dataset", tmp_path / "outside.png"
    root.mkdir()
    (root / "inside.png").write_bytes(encode(Image.new("RGB", (16, 16), (1, 2, 3)), "PNG"))
    outside.write_bytes(encode(Image.new("RGB", (16, 16), (200, 0, 0)), "PNG"))
    return root, ["inside.png", "../outside.png", str(outside)]


def write_parquet_paths(root: Path, paths: list[str]) -> str:
    table = pa.table({"image": pa.array(paths), "text": pa.array(["a cat"] * len(paths))})
    pq.write_table(table, root / "data.parquet")
    return str(root / "data.parquet")


def write_arrow_paths(root: Path, paths: list[str]) -> str:
    images = pa.array([{"bytes": None, "path": p} for p in paths],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": images, "text": pa.array(["a cat"] * len(paths))})
    with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    return str(root)


def write_jsonl_paths(root: Path, paths: list[str]) -> str:
    rows = [json.dumps({"file_name": p, "text": "a cat"}) for p in paths]
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return str(root)


def write_csv_paths(root: Path, paths: list[str]) -> str:
    with open(root / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file_name", "text"], *([p, "a cat"] for p in paths)])
    return str(root)


WRITERS = {"parquet": write_parquet_paths, "arrow": write_arrow_paths, "jsonl": write_jsonl_paths,
           "csv": write_csv_paths}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_paths_leaving_the_dataset_folder_are_rejected_with_the_reason(tmp_path, fmt):
    root, paths = image_files(tmp_path)
    samples = list(open_source(WRITERS[fmt](root, paths)))
    assert [s.reject for s in samples] == [None, "outside_root", "outside_root"]
    assert samples[0].image_bytes == (root / "inside.png").read_bytes()
    assert all(s.image_bytes == b"" and "data.allow_outside_paths" in s.detail for s in samples[1:])


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_allow_outside_paths_reads_them(tmp_path, fmt):
    root, paths = image_files(tmp_path)
    samples = list(open_source(WRITERS[fmt](root, paths), allow_outside_paths=True))
    outside = (tmp_path / "outside.png").read_bytes()
    assert [s.reject for s in samples] == [None, None, None]
    assert [s.image_bytes == outside for s in samples] == [False, True, True]
