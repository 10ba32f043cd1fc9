"""`stablediff finetune` from every starting format, then `ckpt export` and `generate`, as a user runs them.

The bases: a diffusers folder (MiniLM text encoder), an SD 1.x single file with a CLIP text encoder, and a
stablediff run (`tiny_run`). Each fine-tunes 2 LoRA steps on a few digits with the tiny recipe.
"""

import json
from pathlib import Path

import pytest

from stablediff.models.single_file_pipeline import save_single_file
from tests.conftest import run_cli
from tests.models.tiny_sd import tiny_clip_pipeline, tiny_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_run) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    tiny_pipeline(seed=1).save_pretrained(root / "folder", safe_serialization=True)
    single = save_single_file(tiny_clip_pipeline(root / "clip-tokenizer", seed=2), root / "sd1.safetensors")
    return {"folder": root / "folder", "single-file": single, "run": tiny_run}


def succeed(*args) -> str:
    result = run_cli(*map(str, args))
    assert result.returncode == 0, f"stablediff {' '.join(map(str, args))}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.mark.parametrize("kind", ["folder", "single-file", "run"])
def test_finetune_export_generate(bases, kind, tmp_path):
    run_dir, export = tmp_path / "ft", tmp_path / "export"
    said = succeed("finetune", "tiny", "--run-dir", run_dir, "--set", f"finetune.base={bases[kind]}",
                   "--set", "train.max_steps=2", "--set", "data.limit=8", "--set", "sample.per_prompt=1")
    assert f"base: copying {bases[kind].resolve()}" in said and "trainable parameters: " in said
    assert (run_dir / "base" / "model_index.json").is_file() and "done: final loss" in said
    manifest = json.loads((run_dir / "checkpoints" / "manifests" / f"{2:012d}.json").read_text())
    weights = [name for name in manifest["tensors"] if name.startswith(("unet/", "ema/"))]
    assert weights and all(".lora_" in name for name in weights)  # a LoRA checkpoint holds only the adapters
    said = succeed("ckpt", "export", run_dir, "--format", "diffusers", "--out", export)
    assert "from step 2" in said and (export / "model_index.json").is_file()
    assert not list(export.rglob("*lora*"))  # the adapters are merged into a plain pipeline
    images = succeed("generate", export, "a digit", "--steps", "2", "--out", tmp_path / "images")
    assert [line for line in images.splitlines() if line.endswith(".png")] == [str(tmp_path / "images" / "00000-0.png")]
    assert (tmp_path / "images" / "00000-0.png").stat().st_size > 0
