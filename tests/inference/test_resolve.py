"""MODEL resolution: diffusers folder, run directory, single file; and what it is called and hashed as."""

import hashlib
import os
import shutil

import pytest
import torch

from stablediff.checkpoint import CheckpointStore
from stablediff.inference.resolve import model_hash, resolve_model


def test_a_diffusers_folder_is_used_as_is(tiny_model):
    source = resolve_model(tiny_model)
    assert (source.kind, source.path, source.name) == ("folder", tiny_model.resolve(), "tiny-model")


def test_a_run_directory_means_its_export_named_after_the_run(tiny_model, tmp_path):
    run = tmp_path / "my-run"
    shutil.copytree(tiny_model, run / "export" / "diffusers")
    source = resolve_model(run)
    assert (source.kind, source.path, source.name) == ("folder", (run / "export" / "diffusers").resolve(), "my-run")
    assert resolve_model(run / "export" / "diffusers").name == "my-run"


def test_a_run_whose_export_holds_an_older_step_than_its_newest_checkpoint_uses_the_checkpoint(tiny_model, tmp_path):
    run = tmp_path / "run"
    export = run / "export" / "diffusers"
    shutil.copytree(tiny_model, export)
    (export / "stablediff_export.json").write_text('{"step": 2, "weights": "ema"}')
    store = CheckpointStore(run / "checkpoints")
    store.save(2, {"unet/w": torch.zeros(2)})
    assert resolve_model(run).kind == "folder"
    store.save(5, {"unet/w": torch.ones(2)})  # e.g. a resumed run whose final export failed
    source = resolve_model(run)
    assert (source.kind, source.path, source.step) == ("run", run.resolve(), None)
    assert f"{export.resolve()} holds step 2, older than the run's newest checkpoint (step 5)" in source.note


def test_an_export_without_a_step_record_is_judged_by_its_time(tiny_model, tmp_path):
    run = tmp_path / "run"
    export = run / "export" / "diffusers"
    shutil.copytree(tiny_model, export)
    CheckpointStore(run / "checkpoints").save(5, {"unet/w": torch.ones(2)})
    os.utime(export / "model_index.json", (0, 0))  # written long before the checkpoint
    source = resolve_model(run)
    assert source.kind == "run" and "was written before the run's newest checkpoint (step 5)" in source.note
    os.utime(export / "model_index.json")  # now: newer than every checkpoint
    assert resolve_model(run).kind == "folder"


def test_step_or_best_or_no_export_mean_the_runs_checkpoints(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert resolve_model(run).kind == "run"
    assert resolve_model(run, step=100).step == 100 and resolve_model(run, best=True).best


def test_a_safetensors_file_is_a_single_file_model(tmp_path):
    (tmp_path / "v1.safetensors").write_bytes(b"x")
    source = resolve_model(tmp_path / "v1.safetensors")
    assert (source.kind, source.name) == ("single_file", "v1")


def test_the_model_hash_of_a_folder_is_autov2_of_its_unet_file(loaded, tiny_model):
    data = (tiny_model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert model_hash(resolve_model(tiny_model), loaded.pipe) == hashlib.sha256(data).hexdigest()[:10]


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "neither a diffusers pipeline folder"),
    (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "a single-file model is a .safetensors"),
])
def test_what_is_no_model_is_refused_with_a_reason(tmp_path, make, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        resolve_model(make(tmp_path))


def test_step_on_something_that_is_no_run_is_refused(tiny_model):
    with pytest.raises(ValueError, match="--step/--best pick a checkpoint of a run directory"):
        resolve_model(tiny_model, step=3)
