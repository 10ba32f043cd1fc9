"""Training on a user's folder: bad files are quarantined with their reason and the run goes on."""

import json

import numpy as np
from PIL import Image

from tests.conftest import run_cli


def make_folder(root, good: int, bad: int):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a noisy picture number {i}")
    for i in range(bad):
        (root / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
        (root / f"broken{i}.txt").write_text("broken")
    return root


def test_a_corrupt_image_is_quarantined_and_training_finishes(tmp_path):
    source = make_folder(tmp_path / "data", good=30, bad=1)
    run_dir = tmp_path / "run"
    result = run_cli("train", "tiny", "--run-dir", str(run_dir), "--set", f"data.source={source}",
                     "--set", "data.max_reject_fraction=0.1")
    assert result.returncode == 0, result.stderr
    rejects = [json.loads(line) for line in (run_dir / "quarantine.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["undecodable"]
    assert rejects[0]["origin"].endswith("broken0.jpg")
    assert (run_dir / "export" / "diffusers" / "model_index.json").is_file()


def test_too_many_rejects_stop_with_a_clear_error(tmp_path):
    source = make_folder(tmp_path / "data", good=4, bad=4)
    result = run_cli("train", "tiny", "--run-dir", str(tmp_path / "run"), "--set", f"data.source={source}")
    assert result.returncode == 1
    assert "data.max_reject_fraction" in result.stderr and "Traceback" not in result.stderr


def test_data_cache_reuses_the_features_training_wrote(tiny_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    result = run_cli("data", "cache", "tiny", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert "0 images and 0 captions encoded" in result.stderr


def test_data_cache_without_a_vae_is_a_clear_error(tmp_path):
    result = run_cli("data", "cache", "tiny", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 1 and "no VAE to encode with" in result.stderr


def test_flip_augmentation_trains_from_cached_mirrored_latents(tmp_path):
    result = run_cli("train", "tiny", "--run-dir", str(tmp_path / "run"), "--set", "data.flip_probability=0.5")
    assert result.returncode == 0, result.stderr


def test_tag_shuffling_trains_with_each_variant_cached_once(tmp_path):
    source = make_folder(tmp_path / "data", good=12, bad=0)
    for i in range(12):
        (source / f"img{i}.txt").write_text(f"subject{i}, red, noisy, square, picture")
    result = run_cli("train", "tiny", "--run-dir", str(tmp_path / "run"), "--set", f"data.source={source}",
                     "--set", "data.caption_shuffle_variants=3", "--set", "data.keep_tokens=1")
    assert result.returncode == 0, result.stderr
    encoded = int(result.stderr.split(" images and ")[1].split(" captions encoded")[0])
    assert 12 < encoded <= 36  # up to 3 variants per caption, each encoded once
