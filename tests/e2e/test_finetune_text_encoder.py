"""A LoRA fine-tune that trains the text encoder too (finetune.text_encoder.lora), on a tiny SD 1.x-shaped model
with a CLIP text encoder: what trains and at which LR, the exact resume, and the exports loading everywhere."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stablediff.checkpoint import CheckpointStore
from stablediff.config import load_config
from tests.conftest import run_cli
from tests.finetune.lora_fixtures import build_sd_shaped_folder

pytestmark = pytest.mark.slow

STEPS, UNET_LR, TEXT_LR = 4, 0.01, 0.03
TE_ADAPTERS = 2 * 6 * 2  # 2 CLIP layers x (q, k, v, out, fc1, fc2) x (A, B)
PROMPT = "a handwritten digit one"


def overrides(base):
    return [f"finetune.base={base}", "finetune.lora.rank=2", "finetune.text_encoder.lora=true",
            f"finetune.text_encoder.learning_rate={TEXT_LR}", f"train.learning_rate={UNET_LR}",
            f"train.max_steps={STEPS}", "checkpoint.every_steps=1", "data.limit=8", "sample.per_prompt=1",
            "train.threads=1", 'unet.down_block_types=["CrossAttnDownBlock2D","DownBlock2D"]',  # the base's order
            'unet.up_block_types=["UpBlock2D","CrossAttnUpBlock2D"]']


def finetune(base, run_dir):
    """`stablediff finetune tiny --set ...` in this process (the CLI's steps, without its process start)."""
    from stablediff.finetune.plan import plan_finetune
    from stablediff.finetune.run import run_finetune

    config = load_config("tiny", overrides(base))
    return run_finetune(plan_finetune(config, run_dir), run_dir)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_sd_shaped_folder(tmp_path_factory.mktemp("te-lora") / "base")


@pytest.fixture(scope="module")
def te_run(base, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("te-lora-run") / "run"
    finetune(base, run_dir)
    return run_dir


def final_hashes(run_dir):
    manifest = CheckpointStore(run_dir / "checkpoints").read_manifest(STEPS)
    return {name: entry.chunks for name, entry in manifest.tensors.items()}


def test_only_the_adapters_train_and_the_text_encoders_have_their_own_learning_rate(te_run):
    loaded = CheckpointStore(te_run / "checkpoints").load(STEPS)
    groups = {name.split("/")[0] for name in loaded.tensors}
    assert groups == {"unet", "ema", "text_encoder", "optim", "rng"}
    weights = [n for n in loaded.tensors if n.split("/")[0] in ("unet", "ema", "text_encoder")]
    assert all(".lora_A." in n or ".lora_B." in n for n in weights)  # the frozen base costs no bytes
    text = {n: t for n, t in loaded.tensors.items() if n.startswith("text_encoder/")}
    assert len(text) == TE_ADAPTERS
    assert all(t.abs().max() > 0 for n, t in text.items() if ".lora_B." in n)  # B starts at 0: they moved
    param_groups = loaded.meta["optimizer_param_groups"]
    assert [(g["initial_lr"], len(g["params"])) for g in param_groups][-1] == (TEXT_LR, TE_ADAPTERS)
    assert {g["initial_lr"] for g in param_groups[:-1]} == {UNET_LR}
    assert loaded.meta["lora_config"]["text_encoder"]["target_modules"] == ["q_proj", "k_proj", "v_proj",
                                                                            "out_proj", "fc1", "fc2"]


def test_a_run_resumed_after_a_crash_ends_bitwise_equal(base, te_run, tmp_path, capfd):
    run_dir = tmp_path / "resumed"
    shutil.copytree(te_run, run_dir)
    for step in range(3, STEPS + 1):  # the state a kill right after step 2's save leaves: its newer manifests gone
        (run_dir / "checkpoints" / "manifests" / f"{step:012d}.json").unlink()
    capfd.readouterr()
    finetune(base, run_dir)
    assert "resumed from step 2" in capfd.readouterr().err  # the adapters and optimizer state came back
    assert final_hashes(run_dir) == final_hashes(te_run)


def encode(pipe, prompt=PROMPT):
    from stablediff.models.text_encoder import encode_captions

    with torch.no_grad():
        return encode_captions(pipe.tokenizer, pipe.text_encoder, [prompt])


def image(pipe):
    from stablediff.inference.pipeline import txt2img

    with torch.no_grad():
        return np.asarray(txt2img(pipe, PROMPT, steps=2, seed=5)[0], dtype=np.int16)


def test_the_kohya_file_loads_everywhere_and_in_diffusers_gives_the_runs_image(base, te_run):
    from stablediff.models.pipeline_assembly import load_pipeline_folder
    from stablediff.models.run_export import pipeline_from_run

    exported = run_cli("ckpt", "export", str(te_run))  # a LoRA run's default: the kohya file
    assert exported.returncode == 0, exported.stderr
    lora_file = te_run / "export" / f"step-{STEPS:06d}-ema-lora.safetensors"
    tensors = load_file(lora_file)
    text_keys = [k for k in tensors if k.startswith("lora_te_")]
    assert len(text_keys) == TE_ADAPTERS // 2 * 3  # down, up and alpha per module
    assert tensors["lora_te_text_model_encoder_layers_1_mlp_fc2.alpha"].item() == 2.0
    checked = run_cli("lora", "check", str(lora_file), "--base", str(base))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for loader in ("AUTOMATIC1111", "ComfyUI", "diffusers"):
        assert f"{loader}: {len(tensors)} keys load, 0 skipped" in checked.stdout, checked.stdout
    pipe, merged = load_pipeline_folder(base), pipeline_from_run(te_run)
    plain_text = encode(pipe)
    pipe.load_lora_weights(str(lora_file))
    assert torch.allclose(encode(pipe), encode(merged), atol=1e-5)  # the text encoder's part is applied alike
    assert (encode(pipe) - plain_text).abs().max() > 1e-4  # and it did train
    assert np.abs(image(pipe) - image(merged)).max() <= 1


def test_generate_with_the_run_as_lora_makes_the_merged_runs_image(base, te_run, tmp_path):
    import stablediff

    result = run_cli("generate", str(base), PROMPT, "--steps", "2", "--seed", "5", "--lora", str(te_run),
                     "--out", str(tmp_path / "g"))
    assert result.returncode == 0, result.stderr
    png = [line for line in result.stdout.splitlines() if line.endswith(".png")][0]
    with_lora = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    merged = np.asarray(stablediff.load_pipeline(te_run).txt2img(PROMPT, steps=2, seed=5)[0], dtype=np.int16)
    plain = np.asarray(stablediff.load_pipeline(base).txt2img(PROMPT, steps=2, seed=5)[0], dtype=np.int16)
    assert np.abs(with_lora - merged).max() <= 1
    assert np.abs(with_lora - plain).max() > 1  # the LoRA changes the image: the comparison means something


def test_the_diffusers_exports_carry_the_text_encoder(base, te_run, tmp_path):
    from stablediff.cli.ckpt_models import write_export
    from stablediff.finetune.lora_files import load_lora_checkpoint
    from stablediff.models.pipeline_assembly import load_pipeline_folder

    loaded = load_lora_checkpoint(te_run)
    write_export(loaded, "lora-diffusers", tmp_path / "ld", te_run, True, False, False)
    keys = load_file(tmp_path / "ld" / "pytorch_lora_weights.safetensors")
    assert sum(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys) == TE_ADAPTERS
    write_export(loaded, "diffusers", tmp_path / "merged", te_run, True, False, False)
    merged, plain = load_pipeline_folder(tmp_path / "merged"), load_pipeline_folder(base)
    assert not any("lora" in k for k in merged.text_encoder.state_dict())
    from_file = load_pipeline_folder(base)
    from_file.load_lora_weights(str(tmp_path / "ld"))
    assert torch.allclose(encode(merged), encode(from_file), atol=1e-5)
    assert (encode(merged) - encode(plain)).abs().max() > 1e-4
