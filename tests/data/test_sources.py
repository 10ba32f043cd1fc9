"""Every source format yields the same samples, with captions decoded and source rejects named."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest

from stablediff.data.sources import (
    DigitsSource,
    FolderSource,
    MetadataSource,
    ParquetSource,
    SavedDatasetSource,
    SourceError,
    TarSource,
    open_source,
    with_retry,
)
from stablediff.data.sources.tar import expand_braces

from .corpus import FORMATS, GOOD_CAPTIONS, corpus_items, expected, write_folder

SOURCE_CLASSES = {"folder": FolderSource, "jsonl": MetadataSource, "csv": MetadataSource,
                  "tar": TarSource, "parquet": ParquetSource, "arrow": SavedDatasetSource}


@pytest.mark.parametrize("fmt", FORMATS)
def test_open_source_picks_the_format(corpus_specs, fmt):
    assert type(open_source(corpus_specs[fmt])) is SOURCE_CLASSES[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_sample_is_yielded_once_in_a_stable_order(corpus_specs, fmt):
    keys = [sample.key for sample in open_source(corpus_specs[fmt])]
    assert sorted(keys) == sorted(expected(fmt))
    assert keys.index("rgb_jpeg") < keys.index("zz_duplicate")  # decides which copy is kept
    assert keys == [sample.key for sample in open_source(corpus_specs[fmt])]


@pytest.mark.parametrize("fmt", FORMATS)
def test_captions_are_decoded_as_utf8(corpus_specs, fmt):
    samples = {sample.key: sample for sample in open_source(corpus_specs[fmt])}
    for key, caption in GOOD_CAPTIONS.items():
        assert samples[key].caption == caption
        assert samples[key].caption_error is None
    assert samples["latin1_caption"].caption_error == "caption_not_utf8"
    assert samples["no_caption"].caption_error == "missing_caption"


@pytest.mark.parametrize("fmt", FORMATS)
def test_image_bytes_are_the_files_bytes(corpus_specs, fmt):
    originals = {i.key: i.data for i in corpus_items(fmt) if i.reason != "resource_fork"}
    for sample in open_source(corpus_specs[fmt]):
        if sample.key in originals:
            assert sample.image_bytes == originals[sample.key], sample.key


@pytest.mark.parametrize("fmt", ["folder", "jsonl", "tar"])
def test_resource_forks_are_rejected_by_the_source(corpus_specs, fmt):
    forks = [s for s in open_source(corpus_specs[fmt]) if s.reject == "resource_fork"]
    assert [fork.key for fork in forks] == ["__MACOSX/._rgb_jpeg"]
    assert "__MACOSX" in forks[0].origin


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_caption_policy_empty(corpus_specs, fmt):
    samples = {s.key: s for s in open_source(corpus_specs[fmt], caption_policy="empty")}
    assert (samples["no_caption"].caption, samples["no_caption"].caption_error) == ("", None)


def test_missing_caption_policy_filename(tmp_path):
    (tmp_path / "a_red-car.png").write_bytes(corpus_items("folder")[2].data)
    [sample] = open_source(str(tmp_path), caption_policy="filename")
    assert sample.caption == "a red car"


def test_unknown_caption_policy_is_refused(corpus_specs):
    with pytest.raises(SourceError, match="caption policy"):
        open_source(corpus_specs["folder"], caption_policy="guess")


def test_caption_file_with_caption_extension_and_bom(tmp_path):
    (tmp_path / "x.png").write_bytes(corpus_items("folder")[2].data)
    (tmp_path / "x.caption").write_bytes("\ufeff  a cat \n".encode())
    [sample] = open_source(str(tmp_path))
    assert sample.caption == "a cat"


def test_hidden_files_are_skipped_silently(tmp_path):
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "thumb.png").write_bytes(b"x")
    (tmp_path / ".DS_Store").write_bytes(b"x")
    assert list(open_source(str(tmp_path))) == []


def test_metadata_row_naming_a_missing_file_is_a_reject(tmp_path):
    index = '{"file_name": "gone.png", "text": "lost"}\nnot json\n'
    (tmp_path / "metadata.jsonl").write_text(index)
    samples = list(open_source(str(tmp_path)))
    assert [(s.key, s.reject) for s in samples] == [
        ("gone", "missing_image"), ("line 2: not JSON (Expecting value)", "bad_metadata")]


def test_csv_without_file_name_column_is_a_clear_error(tmp_path):
    (tmp_path / "metadata.csv").write_text("image,text\na.png,cat\n")
    with pytest.raises(SourceError, match="file_name"):
        list(open_source(str(tmp_path)))


def test_tar_brace_pattern_names_the_shards(corpus_specs):
    root = Path(corpus_specs["tar"]).parent
    source = open_source(str(root / "shard-{000..001}.tar"))
    assert len(list(source)) == len(expected("tar"))
    assert expand_braces("s-{8..10}-{a,b}.tar") == ["s-8-a.tar", "s-8-b.tar", "s-9-a.tar",
                                                    "s-9-b.tar", "s-10-a.tar", "s-10-b.tar"]


def test_truncated_shard_keeps_earlier_samples_and_reports_the_break(tmp_path, corpus_specs):
    whole = (Path(corpus_specs["tar"]).parent / "shard-000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2])
    samples = list(open_source(str(cut)))
    assert samples[-1].reject == "read_error" and "cut.tar" in samples[-1].origin
    assert all(s.reject != "read_error" for s in samples[:-1]) and len(samples) > 2


def test_tar_member_without_image_is_a_reject(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        info = tarfile.TarInfo("0001.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"cat"))
    [sample] = open_source(str(tmp_path / "s.tar"))
    assert (sample.key, sample.reject) == ("0001", "missing_image")


def test_folder_is_read_through_fsspec_urls(tmp_path):
    items = corpus_items("folder")[1:4]
    write_folder(tmp_path, items)
    fs = fsspec.filesystem("memory")
    for path in tmp_path.rglob("*"):
        if path.is_file():
            fs.pipe(f"/corpus/{path.relative_to(tmp_path).as_posix()}", path.read_bytes())
    samples = list(open_source("memory://corpus"))
    assert sorted(s.key for s in samples) == sorted(item.key for item in items)
    assert all(s.caption for s in samples)


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(tmp_path / "nowhere"))


def test_unknown_format_is_a_clear_error(tmp_path):
    (tmp_path / "notes.docx").write_bytes(b"x")
    with pytest.raises(SourceError, match="not a data source"):
        open_source(str(tmp_path / "notes.docx"))


def test_transient_errors_are_retried_then_succeed():
    failures = iter([OSError("connection reset"), OSError("timed out")])

    def flaky() -> bytes:
        error = next(failures, None)
        if error:
            raise error
        return b"data"

    assert with_retry(flaky, "flaky file", base_delay=0.001) == b"data"


def test_persistent_errors_give_up_after_three_tries_and_missing_files_at_once():
    calls = []

    def broken() -> bytes:
        calls.append(1)
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="failed 3 times"):
        with_retry(broken, "x", base_delay=0.001)
    assert len(calls) == 3

    def missing() -> bytes:
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        with_retry(missing, "x", base_delay=0.001)
    assert len(calls) == 4


def test_reads_a_dataset_dict_with_a_train_split(tmp_path, corpus_specs):
    arrow = Path(corpus_specs["arrow"])
    for split in ("test", "train"):
        (tmp_path / split).mkdir()
        for file in arrow.iterdir():
            (tmp_path / split / file.name).write_bytes(file.read_bytes())
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "train"]}))
    source = open_source(str(tmp_path))
    assert isinstance(source, SavedDatasetSource) and source.folder.endswith("/train")
    assert len(list(source)) == len(expected("arrow"))


def test_reads_a_folder_written_by_the_datasets_package(tmp_path):
    import datasets  # a dev dependency: this test never skips
    items = [item for item in corpus_items("arrow") if item.reason is None]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    data = {"image": [{"bytes": i.data, "path": i.file_name} for i in items],
            "text": [i.caption.decode() for i in items]}
    # Built from an Arrow table with a given fingerprint: Dataset.from_dict hashes its input
    # with dill, which some datasets/pyarrow version pairs cannot pickle.
    table = pa.table(features.encode_batch(data), schema=features.arrow_schema)
    dataset = datasets.Dataset(datasets.table.InMemoryTable(table),
                               info=datasets.DatasetInfo(features=features), fingerprint="corpus")
    dataset.save_to_disk(str(tmp_path / "ds"))
    samples = list(open_source(str(tmp_path / "ds")))
    # datasets keeps only the base name of an image's path.
    assert [s.key for s in samples] == [i.key.split("/")[-1] for i in items]
    assert [s.image_bytes for s in samples] == [i.data for i in items]
    assert all(s.caption and s.caption_error is None for s in samples)


def test_builtin_digits_is_a_source_like_any_other():
    source = open_source("builtin:digits")
    assert isinstance(source, DigitsSource)
    first = next(iter(source))
    assert first.image_bytes.startswith(b"\x89PNG") and first.caption
    with pytest.raises(SourceError, match="builtin:digits"):
        open_source("builtin:cifar")
