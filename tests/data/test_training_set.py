"""The training data path applies the data config's limits: data.max_aspect, data.allow_outside_paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from stablediff.config.schema import DataConfig
from stablediff.data.training_set import load_training_data

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
    config = DataConfig(source=str(source), resolution=16, max_reject_fraction=0.5, num_workers=0,
                        caption_policy="filename", **data)
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
