"""`stablediff finetune` with DreamBooth prior preservation on the tiny run: class images made once, exact resume."""

import pytest

from stablediff.checkpoint import CheckpointStore
from tests.conftest import run_cli

PRIOR = ["--set", "finetune.lora.rank=1", "--set", "train.threads=1", "--set", "train.lr_schedule=constant",
         "--set", "finetune.instance_prompt=a photo of sks digit", "--set", "finetune.prior.class_prompt=a digit",
         "--set", "finetune.prior.num_class_images=4", "--set", "finetune.prior.steps=2",
         "--set", "finetune.prior.loss_weight=0.5"]


def dreambooth(base, run_dir, max_steps: int):
    return run_cli("finetune", "tiny", "--set", f"finetune.base={base}", *PRIOR, "--set", f"train.max_steps={max_steps}",
                   "--run-dir", str(run_dir))


def class_images(run_dir):
    return {p.name: p.read_bytes() for p in sorted((run_dir / "class_images").iterdir())}


def final_hashes(run_dir, step):
    manifest = CheckpointStore(run_dir / "checkpoints").read_manifest(step)
    return {name: entry.chunks for name, entry in manifest.tensors.items()}


@pytest.mark.slow
def test_dreambooth_generates_the_class_images_once_and_resumes_exactly(tiny_run, tmp_path):
    first = dreambooth(tiny_run, tmp_path / "run", 2)
    assert first.returncode == 0, first.stderr
    assert "class images: generating 4 of 4 with the base model" in first.stderr
    assert "and 4 class images ('a digit', loss weight 0.5)" in first.stderr
    made = class_images(tmp_path / "run")
    assert list(made) == [f"{i:05d}.png" for i in range(4)]

    resumed = dreambooth(tiny_run, tmp_path / "run", 4)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 2" in resumed.stdout + resumed.stderr
    assert "class images: all 4 in" in resumed.stderr and "generating" not in resumed.stderr
    assert class_images(tmp_path / "run") == made

    straight = dreambooth(tiny_run, tmp_path / "straight", 4)  # its own class images, from the same seeds
    assert straight.returncode == 0, straight.stderr
    assert class_images(tmp_path / "straight") == made
    assert final_hashes(tmp_path / "run", 4) == final_hashes(tmp_path / "straight", 4)
