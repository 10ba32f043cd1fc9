"""The training data path applies the data config: data.max_aspect, data.allow_outside_paths, the held-out split
(data.held_out_fraction, data.validation_source)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stablediff.config.schema import DataConfig
from stablediff.data.digits import load_digits
from stablediff.data.training_set import is_held_out, load_training_data
from stablediff.data.validate import TooManyRejectsError, content_hash
from stablediff.errors import DataError

from .corpus import encode


def write_dataset(root: Path, sizes: dict[str, tuple[int, int]], seed: int = 0) -> None:
    root.mkdir(parents=True)
    for index, (name, size) in enumerate(sizes.items()):
        pixels = np.random.default_rng(seed + index).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        (root / f"{name}.png").write_bytes(encode(Image.fromarray(pixels), "PNG"))


def quarantined(run_dir: Path) -> list[tuple[str, str]]:
    path = run_dir / "quarantine.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(record["key"], record["reason"]) for record in map(json.loads, lines)]


def load(source: Path, run_dir: Path, **data):
    config = DataConfig(source=str(source), resolution=16, num_workers=0, caption_policy="filename",
                        **{"max_reject_fraction": 0.5, **data})
    return load_training_data(config, seed=0, run_dir=run_dir, bucket_step=8, log=lambda _: None)


def test_data_max_aspect_rejects_for_training(tmp_path):
    write_dataset(tmp_path / "data", {f"square{i}": (16, 16) for i in range(4)} | {"wide": (64, 16)})
    load(tmp_path / "data", tmp_path / "run", max_aspect=3.0)
    assert quarantined(tmp_path / "run") == [("wide", "max_aspect")]
    load(tmp_path / "data", tmp_path / "run-default")  # 4:1 is within the default of 20
    assert quarantined(tmp_path / "run-default") == []


def test_data_allow_outside_paths_reaches_the_table_sources(tmp_path):
    write_dataset(tmp_path / "data", {f"square{i}": (16, 16) for i in range(4)})
    write_dataset(tmp_path / "elsewhere", {"outside": (16, 16)}, seed=10)
    rows = [{"file_name": f"square{i}.png", "text": "a square"} for i in range(4)]
    rows.append({"file_name": "../elsewhere/outside.png", "text": "outside"})
    (tmp_path / "data" / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    load(tmp_path / "data", tmp_path / "run")
    assert quarantined(tmp_path / "run") == [("../elsewhere/outside", "outside_root")]
    load(tmp_path / "data", tmp_path / "run-allowed", allow_outside_paths=True)
    assert quarantined(tmp_path / "run-allowed") == []


def training_images(data) -> set[bytes]:
    """The training images of a load as uint8 bytes (one entry per image)."""
    return {image.tobytes() for image in ((data.images.numpy() + 1) * 127.5).round().astype(np.uint8)}


def pixels_of(folder: Path) -> set[bytes]:
    """The CHW uint8 bytes of every PNG in a folder of 16x16 images, as the loader's tensors hold them."""
    return {np.asarray(Image.open(path)).transpose(2, 0, 1).tobytes() for path in folder.glob("*.png")}


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.5])
def test_held_out_fraction_holds_out_about_that_share_the_same_ones_every_load(tmp_path, fraction):
    n = 300
    write_dataset(tmp_path / "data", {f"image{i:03d}": (16, 16) for i in range(n)})
    first = load(tmp_path / "data", tmp_path / "run", held_out_fraction=fraction)
    again = load(tmp_path / "data", tmp_path / "run-again", held_out_fraction=fraction)
    held = 0 if first.held_out_is_training else len(first.held_out)
    assert held + len(first.captions) == n
    assert abs(held / n - fraction) <= 3 * math.sqrt(fraction * (1 - fraction) / n) + 1 / n
    assert first.keys == again.keys and torch.equal(first.held_out, again.held_out)
    assert (held == 0) == (fraction == 0) == first.held_out_is_training


def test_a_larger_fraction_holds_out_what_a_smaller_one_did_and_more(tmp_path):
    write_dataset(tmp_path / "data", {f"image{i:03d}": (16, 16) for i in range(100)})
    small = load(tmp_path / "data", tmp_path / "run", held_out_fraction=0.05)
    large = load(tmp_path / "data", tmp_path / "run-large", held_out_fraction=0.3)
    assert set(large.keys) < set(small.keys)


def test_the_default_fraction_holds_out_what_one_in_twenty_by_hash_did():
    hashes = [content_hash(bytes([i % 256, i // 256])) for i in range(2000)]
    assert [is_held_out(h, 0.05) for h in hashes] == [int(h[:8], 16) % 20 == 0 for h in hashes]


def test_with_no_held_out_images_the_autoencoder_still_gets_one_and_the_log_says_none(tmp_path):
    write_dataset(tmp_path / "data", {f"image{i}": (16, 16) for i in range(6)})
    lines = []
    config = DataConfig(source=str(tmp_path / "data"), resolution=16, num_workers=0, caption_policy="filename",
                        held_out_fraction=0)
    data = load_training_data(config, seed=0, run_dir=tmp_path / "run", bucket_step=8, log=lines.append)
    assert len(data.captions) == 6 and data.held_out_is_training and len(data.held_out) == 1
    assert "6 training and 0 held-out samples" in lines[0] and "data.validation_source" in lines[0]


def test_a_validation_source_is_the_held_out_set_and_nothing_of_the_training_folder_is_held_out(tmp_path):
    write_dataset(tmp_path / "train", {f"image{i:02d}": (16, 16) for i in range(20)})
    write_dataset(tmp_path / "val", {f"val{i}": (16, 16) for i in range(4)}, seed=100)
    data = load(tmp_path / "train", tmp_path / "run", held_out_fraction=0.5, validation_source=str(tmp_path / "val"))
    assert len(data.captions) == 20 and training_images(data) == pixels_of(tmp_path / "train")
    held = ((data.held_out.numpy() + 1) * 127.5).round().astype(np.uint8)
    assert {image.tobytes() for image in held} == pixels_of(tmp_path / "val") and len(held) == 4
    assert sorted(data.held_out_captions) == ["val0", "val1", "val2", "val3"] and not data.held_out_is_training


def test_a_corrupt_image_in_the_validation_source_is_quarantined_not_fatal(tmp_path):
    write_dataset(tmp_path / "train", {f"image{i}": (16, 16) for i in range(5)})
    write_dataset(tmp_path / "val", {f"val{i}": (16, 16) for i in range(3)}, seed=100)
    (tmp_path / "val" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = load(tmp_path / "train", tmp_path / "run", validation_source=str(tmp_path / "val"))
    assert len(data.held_out) == 3 and len(data.captions) == 5
    assert quarantined(tmp_path / "run") == [("broken", "undecodable")]


def test_a_validation_source_past_the_reject_limit_or_with_nothing_usable_stops_the_load(tmp_path):
    write_dataset(tmp_path / "train", {f"image{i}": (16, 16) for i in range(5)})
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(TooManyRejectsError, match="1 of 1 samples"):
        load(tmp_path / "train", tmp_path / "run", validation_source=str(tmp_path / "val"))
    with pytest.raises(DataError, match="data.validation_source .* no usable validation samples"):
        load(tmp_path / "train", tmp_path / "run2", validation_source=str(tmp_path / "val"), max_reject_fraction=1.0)


def test_the_digits_take_a_validation_source_in_place_of_their_held_out_split(tmp_path):
    write_dataset(tmp_path / "val", {f"val{i}": (16, 16) for i in range(3)})
    config = DataConfig(source="builtin:digits?digits=9&count=20", resolution=16, num_workers=0,
                        caption_policy="filename", validation_source=str(tmp_path / "val"))
    data = load_training_data(config, seed=0, run_dir=tmp_path / "run", bucket_step=8, log=lambda _: None)
    assert len(data.captions) == 20 and len(data.held_out) == 3 and sorted(data.held_out_captions)[0] == "val0"


def test_a_folder_can_be_validated_on_a_selection_of_the_digits(tmp_path):
    write_dataset(tmp_path / "train", {f"image{i}": (16, 16) for i in range(5)})
    data = load(tmp_path / "train", tmp_path / "run", validation_source="builtin:digits:held_out?digits=9")
    _, held = load_digits(16)
    assert len(data.captions) == 5 and len(data.held_out) == (held.labels == 9).sum()
    assert all("nine" in c or "9" in c for c in data.held_out_captions)
