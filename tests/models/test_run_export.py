"""pipeline_from_run: the pipeline of any checkpoint of a real (tiny) training run."""

import pytest
import torch
from safetensors.torch import load_file

from stablediff.checkpoint import CheckpointStore
from stablediff.models.run_export import load_run_checkpoint, pipeline_from_run
from tests.models.tiny_sd import assert_same_tensors


def test_newest_checkpoint_gives_the_runs_exported_ema_unet(tiny_run):
    pipe = pipeline_from_run(tiny_run)
    exported = load_file(tiny_run / "export" / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors")
    assert_same_tensors(pipe.unet.state_dict(), exported)
    vae = load_file(tiny_run / "export" / "diffusers" / "vae" / "diffusion_pytorch_model.safetensors")
    assert_same_tensors(pipe.vae.state_dict(), vae)


def test_step_picks_an_older_checkpoint(tiny_run):
    steps = CheckpointStore(tiny_run / "checkpoints").steps()
    assert len(steps) >= 2, steps
    older = pipeline_from_run(tiny_run, step=steps[0])
    stored = CheckpointStore(tiny_run / "checkpoints").load(steps[0]).tensors
    assert_same_tensors(older.unet.state_dict(), {k[4:]: v for k, v in stored.items() if k.startswith("ema/")})
    newest = pipeline_from_run(tiny_run).unet.state_dict()
    assert any(not torch.equal(newest[k], v) for k, v in older.unet.state_dict().items())


def test_no_ema_gives_the_raw_trained_unet(tiny_run):
    loaded = CheckpointStore(tiny_run / "checkpoints").load()
    raw = pipeline_from_run(tiny_run, ema=False).unet.state_dict()
    assert_same_tensors(raw, {k[5:]: v for k, v in loaded.tensors.items() if k.startswith("unet/")})


def test_best_needs_a_val_loss_or_takes_the_lowest(tiny_run):
    summaries = CheckpointStore(tiny_run / "checkpoints").list()
    scored = [(s.metrics["val_loss"], s.step) for s in summaries if "val_loss" in s.metrics]
    if not scored:
        with pytest.raises(ValueError, match="val_loss"):
            pipeline_from_run(tiny_run, best=True)
    else:
        assert load_run_checkpoint(tiny_run, best=True).step == min(scored)[1]


def test_a_folder_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        pipeline_from_run(tmp_path)


def test_step_and_best_together_are_refused(tmp_path):
    from stablediff.checkpoint import CheckpointStore
    from stablediff.models.run_export import choose_step

    with pytest.raises(ValueError, match="either --step or --best, not both"):
        choose_step(CheckpointStore(tmp_path / "checkpoints"), step=3, best=True)
