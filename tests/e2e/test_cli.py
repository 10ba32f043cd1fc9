"""Whole commands as a user runs them: train a tiny config, generate, load the export in diffusers."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli


def test_train_writes_the_run_directory(tiny_run):
    assert (tiny_run / "config.yaml").is_file()
    assert (tiny_run / "samples" / "final.png").is_file()
    assert (tiny_run / "export" / "diffusers" / "model_index.json").is_file()
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "unet" and np.isfinite(r["loss"]) for r in records)


def test_sample_grid_has_a_row_per_prompt(tiny_run):
    grid = Image.open(tiny_run / "samples" / "final.png")
    assert grid.size == (16 * 2, 16 * 2)  # tiny.yaml: 2 prompts x 2 seeds at 16 px


def test_generate_writes_pngs_with_parameters(tiny_run, tmp_path):
    result = run_cli("generate", str(tiny_run), "a handwritten digit one", "--steps", "3", "--num", "2",
                     "--seed", "5", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    paths = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in paths] == ["00000-5.png", "00001-6.png"]
    text = Image.open(paths[0]).text["parameters"]
    assert text.startswith("a handwritten digit one\n") and "Seed: 5" in text and "Steps: 3" in text


def test_same_seed_same_image_and_nothing_overwritten(tiny_run, tmp_path):
    for _ in range(2):
        assert run_cli("generate", str(tiny_run), "the number 7", "--steps", "3", "--seed", "11",
                       "--out", str(tmp_path)).returncode == 0
    first, second = sorted(tmp_path.glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_export_loads_in_plain_diffusers_and_matches_generate(tiny_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    assert run_cli("generate", str(tiny_run / "export" / "diffusers"), "digit 3, handwritten", "--steps", "4",
                   "--guidance", "2.5", "--seed", "42", "--out", str(tmp_path)).returncode == 0
    ours = np.asarray(Image.open(next(tmp_path.glob("*.png"))).convert("RGB"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_run / "export" / "diffusers", local_files_only=True)
    theirs = pipe("digit 3, handwritten", num_inference_steps=4, guidance_scale=2.5,
                  generator=torch.Generator().manual_seed(42)).images[0]
    assert np.array_equal(ours, np.asarray(theirs))


def test_bad_set_key_exits_1_with_a_clear_message(tmp_path):
    result = run_cli("train", "tiny", "--run-dir", str(tmp_path / "r"), "--set", "train.max_stepz=3")
    assert result.returncode == 1
    assert "unknown config key 'train.max_stepz'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()  # failed before any work


def test_generate_on_a_missing_model_exits_1(tmp_path):
    result = run_cli("generate", str(tmp_path / "nothing"), "x")
    assert result.returncode == 1 and "does not exist" in result.stderr


@pytest.mark.parametrize("args", [["generate"], ["train"], ["generate", "m", "p", "--size", "big"]])
def test_usage_errors_exit_2(args):
    assert run_cli(*args).returncode == 2


def test_pickle_weights_are_refused_unless_trusted(tiny_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    pickled = tmp_path / "pickled"
    StableDiffusionPipeline.from_pretrained(tiny_run / "export" / "diffusers").save_pretrained(
        pickled, safe_serialization=False)
    refused = run_cli("generate", str(pickled), "x", "--steps", "2", "--out", str(tmp_path / "o"))
    assert refused.returncode == 1
    assert "pickle" in refused.stderr and "--trust-pickle" in refused.stderr
    assert not (tmp_path / "o").exists()
    trusted = run_cli("generate", str(pickled), "x", "--steps", "2", "--out", str(tmp_path / "o"), "--trust-pickle")
    assert trusted.returncode == 0, trusted.stderr


def test_a_pickle_vae_folder_is_refused_before_training(tiny_run, tmp_path):
    from diffusers import AutoencoderKL

    vae_dir = tmp_path / "vae"
    AutoencoderKL.from_pretrained(tiny_run / "export" / "diffusers" / "vae").save_pretrained(
        vae_dir, safe_serialization=False)
    result = run_cli("train", "tiny", "--run-dir", str(tmp_path / "r"), "--set", f"vae.pretrained={vae_dir}")
    assert result.returncode == 1 and "--trust-pickle" in result.stderr


def test_fresh_refuses_a_non_empty_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("earlier work")
    result = run_cli("train", "tiny", "--run-dir", str(run_dir), "--fresh")
    assert result.returncode == 1 and "--fresh" in result.stderr and "not empty" in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["keep.txt"]  # nothing touched


def test_generate_on_a_folder_that_is_no_model_exits_1(tmp_path):
    result = run_cli("generate", str(tmp_path), "x")
    assert result.returncode == 1 and "neither a diffusers pipeline folder" in result.stderr


@pytest.mark.parametrize("command", ["train", "data cache"])
def test_a_missing_data_source_is_reported_before_anything_is_made(tmp_path, command):
    run_dir = tmp_path / "run"
    result = run_cli(*command.split(), "tiny", "--run-dir", str(run_dir), "--set",
                     f"data.source={tmp_path / 'no-such-folder'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"data source {tmp_path / 'no-such-folder'} does not exist" in result.stderr
    assert not run_dir.exists()


def test_a_run_dir_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    result = run_cli("train", "tiny", "--run-dir", str(tmp_path / "notes.txt"))
    assert result.returncode == 1 and "Errno" not in result.stderr
    assert f"the run directory {tmp_path / 'notes.txt'}: it is a file, not a folder" in result.stderr
