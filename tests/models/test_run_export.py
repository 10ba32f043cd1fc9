"""pipeline_from_run: the pipeline of any checkpoint of a real (tiny) training run."""

import pytest
import torch
from safetensors.torch import load_file

from stablediff.checkpoint import CheckpointStore
from stablediff.models.run_export import load_run_checkpoint, pipeline_from_run, save_lora
from tests.models.tiny_sd import assert_same_tensors, tiny_unet


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


def test_lora_export_needs_lora_weights(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="no LoRA weights"):
        save_lora(load_run_checkpoint(tiny_run), tmp_path / "lora.safetensors", "the run")


def test_lora_adapters_are_written_in_the_format_diffusers_loads(tmp_path):
    from peft import LoraConfig

    from tests.models.tiny_sd import tiny_pipeline

    unet = tiny_unet()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights="gaussian")
    unet.add_adapter(config)
    with torch.no_grad():  # lora_B starts at zero (a no-op adapter); make it a trained-looking one
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    store.save(3, {f"unet/{k}": v for k, v in unet.state_dict().items()}, {"stage": "unet", "config": {},
                                                                        "lora_config": _json_ready(config.to_dict())})
    out = save_lora(load_run_checkpoint(tmp_path / "run"), tmp_path / "lora.safetensors", "the run")
    written = load_file(out)
    assert written and all(k.startswith("unet.") and "lora_" in k and ".default." not in k for k in written)
    pipe = tiny_pipeline()  # the same base UNet the adapters were added to
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 8, 384)
    with torch.no_grad():
        base = pipe.unet(sample, 10, context).sample
        pipe.load_lora_weights(str(out))
        with_lora, trained = pipe.unet(sample, 10, context).sample, unet(sample, 10, context).sample
    assert not torch.allclose(base, trained)
    assert torch.allclose(with_lora, trained, atol=1e-6)


def _json_ready(config: dict) -> dict:
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()
            if isinstance(v, (str, int, float, bool, list, set, type(None)))}


def test_step_and_best_together_are_refused(tmp_path):
    from stablediff.checkpoint import CheckpointStore
    from stablediff.models.run_export import choose_step

    with pytest.raises(ValueError, match="either --step or --best, not both"):
        choose_step(CheckpointStore(tmp_path / "checkpoints"), step=3, best=True)
