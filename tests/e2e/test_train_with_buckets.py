"""Training on a folder of mixed aspect ratios with buckets and cached random crops, and resuming it."""

from pathlib import Path

from tests.conftest import run_cli
from tests.data.corpus import build_mixed_aspect_folder

BUCKETED = ["--set", "data.buckets=auto", "--set", "data.resolution=32", "--set", "data.crop=random",
            "--set", "data.crop_variants=2", "--set", "data.flip_probability=0.5", "--set", "data.num_workers=2",
            "--set", "checkpoint.every_steps=2"]


def test_bucketed_training_caches_each_bucket_and_crop_and_resumes(tmp_path):
    source = build_mixed_aspect_folder(tmp_path / "data")
    run_dir = tmp_path / "run"
    args = ["train", "tiny", "--run-dir", str(run_dir), "--set", f"data.source={source}", *BUCKETED]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    buckets = int(first.stderr.split(" buckets")[0].rsplit(" ", 1)[-1])
    assert buckets > 1
    namespaces = list(Path(run_dir, "features", "latents").glob("*/transform-*"))
    assert len(namespaces) == 2 * buckets  # one per (bucket, crop variant)

    second = run_cli(*args, "--set", "train.max_steps=6")
    assert second.returncode == 0, second.stderr
    assert "resumed from step 4" in second.stderr
    assert "0 images and 0 captions encoded" in second.stderr  # everything came from the cache
