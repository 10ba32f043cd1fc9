"""`stablediff finetune` as a user runs it: a LoRA on the tiny run, early stopping, the best export, bad input."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from stablediff.checkpoint import CheckpointStore
from tests.conftest import REPO, run_cli

LORA = ["--set", "finetune.lora.rank=1", "--set", "train.threads=1", "--set", "train.learning_rate=0.01"]


def finetune_args(base, *extra):
    return ["finetune", "tiny", "--set", f"finetune.base={base}", *LORA, *extra]


EARLY = ["--set", "train.max_steps=40", "--set", "train.validate_every=2", "--set", "early_stopping.patience=2",
         "--set", "early_stopping.min_delta=1.0", "--set", "checkpoint.every_steps=2"]


@pytest.fixture(scope="module")
def early_stopped(tiny_run, tmp_path_factory):
    """A LoRA run that cannot improve by min_delta=1: it stops after `patience` evaluations, best at the first."""
    run_dir = tmp_path_factory.mktemp("ft") / "run"
    result = run_cli(*finetune_args(tiny_run, *EARLY), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    return run_dir, result


@pytest.mark.slow
def test_early_stopping_ends_the_run_and_says_why(early_stopped):
    run_dir, result = early_stopped
    assert "stopped early at step 6: val_loss has not improved" in result.stderr
    assert "stopped early" in result.stdout
    assert max(CheckpointStore(run_dir / "checkpoints").steps()) == 6
    assert json.loads((run_dir / "eval.json").read_text())["best"]["step"] == 2
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "early_stopping" and e["best_step"] == 2 for e in events)
    assert any(e.get("event") == "trainable" for e in events)


@pytest.mark.slow
def test_the_trainable_report_is_printed_before_the_first_step(early_stopped):
    stderr = early_stopped[1].stderr
    assert stderr.index("trainable parameters:") < stderr.index("unet: step")
    assert "down_blocks.1" in stderr and "frozen" in stderr


@pytest.mark.slow
def test_a_stopped_run_started_again_stays_stopped(early_stopped, tiny_run):
    run_dir, _ = early_stopped
    again = run_cli(*finetune_args(tiny_run, *EARLY), "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stderr
    assert "run already complete at step 6" in again.stdout
    assert max(CheckpointStore(run_dir / "checkpoints").steps()) == 6


@pytest.mark.slow
def test_lora_checkpoints_hold_only_the_adapters_and_cost_little(early_stopped, tiny_run):
    run_dir, _ = early_stopped
    store = CheckpointStore(run_dir / "checkpoints")
    manifest = store.read_manifest(6)
    model_tensors = [n for n in manifest.tensors if n.split("/")[0] in ("unet", "ema", "vae")]
    assert model_tensors and all("lora_" in n for n in model_tensors)
    full = CheckpointStore(tiny_run / "checkpoints")
    full_bytes = sum(e.nbytes for e in full.read_manifest(max(full.steps())).tensors.values())
    new_bytes = {s.step: s.bytes_new for s in store.list()}[6]
    assert new_bytes <= 0.02 * full_bytes, (new_bytes, full_bytes)
    listing = run_cli("ckpt", "list", str(run_dir))
    assert listing.returncode == 0, listing.stderr


@pytest.mark.slow
def test_export_and_generate_take_the_best_checkpoint_not_the_last(early_stopped, tmp_path):
    run_dir, _ = early_stopped
    exported = run_cli("ckpt", "export", str(run_dir), "--format", "diffusers", "--out", str(tmp_path / "model"))
    assert exported.returncode == 0, exported.stderr
    assert "from step 2, the best" in exported.stdout
    images = run_cli("generate", str(run_dir), "a handwritten digit one", "--steps", "2", "--out", str(tmp_path / "g"))
    assert images.returncode == 0, images.stderr
    assert list((tmp_path / "g").glob("*.png"))


def final_hashes(run_dir, step):
    manifest = CheckpointStore(run_dir / "checkpoints").read_manifest(step)
    return {name: entry.chunks for name, entry in manifest.tensors.items()}


def steps_in(run_dir):
    return CheckpointStore(run_dir / "checkpoints").steps()


def kill_after_step(args, run_dir, step, rng):
    """Start the run as a real process, SIGKILL it at a random moment (0-0.5 s) after the checkpoint of
    `step` is committed, in whatever it is doing then (a step, a save, a chunk half written)."""
    proc = subprocess.Popen([sys.executable, "-m", "stablediff", *args, "--run-dir", str(run_dir)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not any(s >= step for s in steps_in(run_dir)):
        assert proc.poll() is None, f"the run ended before its step-{step} checkpoint:\n{proc.communicate()[0]}"
        assert time.monotonic() < deadline, f"no step-{step} checkpoint in 300 s"
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.5))
    assert proc.poll() is None, "the run finished before it could be killed: raise max_steps"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


@pytest.mark.slow
def test_a_lora_run_sigkilled_at_random_moments_resumes_bitwise(tiny_run, tmp_path):
    """Killed twice (the second time after it had resumed once), it ends as the uninterrupted run."""
    args = finetune_args(tiny_run, "--set", "train.max_steps=12", "--set", "checkpoint.every_steps=1")
    straight = subprocess.Popen([sys.executable, "-m", "stablediff", *args, "--run-dir", str(tmp_path / "straight")],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir, rng = tmp_path / "killed", random.Random(7)
    for step in (3, 7):
        kill_after_step(args, run_dir, step, rng)
        assert step <= max(steps_in(run_dir)) < 12
    killed_at = max(steps_in(run_dir))
    result = run_cli(*args, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert "resumed from step" in result.stderr and killed_at >= 7
    straight_output = straight.communicate(timeout=300)[0]
    assert straight.returncode == 0, straight_output
    assert final_hashes(run_dir, 12) == final_hashes(tmp_path / "straight", 12)


DROPOUTS = ["--set", "finetune.lora.rank_dropout=0.5", "--set", "finetune.lora.module_dropout=0.5",
            "--set", "checkpoint.every_steps=1", "--set", "train.max_steps=4"]


@pytest.mark.slow
def test_a_lora_run_with_rank_and_module_dropout_resumes_bitwise(tiny_run, tmp_path):
    """Their draws come from the generators each checkpoint saves: a run that lost its checkpoints after step 2
    (as a kill leaves it) resumes and ends as the uninterrupted one."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_cli(*finetune_args(tiny_run, *DROPOUTS), "--run-dir", str(straight))
    assert result.returncode == 0, result.stderr
    shutil.copytree(straight, resumed)
    store = CheckpointStore(resumed / "checkpoints")
    for step in (3, 4):
        store.delete_manifest(step)
    result = run_cli(*finetune_args(tiny_run, *DROPOUTS), "--run-dir", str(resumed))
    assert result.returncode == 0, result.stderr
    assert "resumed from step 2" in result.stderr
    assert final_hashes(resumed, 4) == final_hashes(straight, 4)
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r.get("stage") == "unet" and "loss" in r]
    assert sorted(steps) == sorted(set(steps))  # steps 3 and 4 were logged once, not again after the redo
    assert [r["event"] for r in records if r.get("event") in ("data", "trainable")] == ["data", "trainable"] * 2
    loaded = store.load(4)
    assert {k: loaded.meta["lora_config"][k] for k in ("rank_dropout", "module_dropout")} == {
        "rank_dropout": 0.5, "module_dropout": 0.5}
    # AdamW counts a parameter's steps only when it had a gradient: skipped branches really were skipped
    counts = {int(t) for name, t in loaded.tensors.items() if name.startswith("optim/") and name.endswith("/step")}
    assert len(counts) > 1 and max(counts) == 4


@pytest.mark.parametrize("setting, words", [
    ("finetune.freeze=[\"nothing_like_this.*\"]", "matches no trainable parameter"),
    ("finetune.lora.targets=[\"to_nowhere\"]", "no Linear or Conv2d layer"),
    ("train.prediction_type=v_prediction", "contradicts the base"),
])
def test_bad_fine_tune_settings_exit_1_in_one_paragraph_and_write_nothing(tiny_run, tmp_path, setting, words):
    run_dir = tmp_path / "run"
    result = run_cli(*finetune_args(tiny_run, "--set", setting), "--run-dir", str(run_dir))
    assert result.returncode == 1, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_a_base_of_another_architecture_is_refused_before_anything_is_written(tmp_path):
    folder = tmp_path / "sdxl"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    result = run_cli(*finetune_args(folder), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "StableDiffusionXLPipeline" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_missing_base_is_named(tmp_path):
    result = run_cli(*finetune_args(tmp_path / "nowhere.safetensors"), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "nowhere.safetensors does not exist" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_exported_lora_loads_in_diffusers_and_gives_the_fine_tunes_image(early_stopped, tiny_run):
    """diffusers' own load_lora_weights on our kohya file == the run's adapters merged by stablediff."""
    import numpy as np

    from stablediff.inference.pipeline import txt2img
    from stablediff.models.pipeline_assembly import load_pipeline_folder
    from stablediff.models.run_export import pipeline_from_run

    run_dir, _ = early_stopped
    exported = run_cli("ckpt", "export", str(run_dir))  # a LoRA run's default: the kohya file of the best step
    assert exported.returncode == 0, exported.stderr
    lora_file = run_dir / "export" / "step-000002-ema-lora.safetensors"
    checked = run_cli("lora", "check", str(lora_file), "--base", str(tiny_run / "export" / "diffusers"))
    assert "ComfyUI: 96 keys load, 0 skipped" in checked.stdout and "diffusers: 96 keys load, 0 skipped" in checked.stdout

    def image(pipe):
        return np.asarray(txt2img(pipe, "a handwritten digit one", steps=3, seed=5)[0], dtype=np.int16)

    base = load_pipeline_folder(tiny_run / "export" / "diffusers")
    plain = image(base)
    base.load_lora_weights(str(lora_file))
    with_lora = image(base)
    merged = image(pipeline_from_run(run_dir))
    assert np.abs(with_lora - merged).max() <= 1
    assert np.abs(with_lora - plain).max() > 0  # the LoRA does change the image


@pytest.mark.slow
def test_generate_takes_a_lora_run_directory_as_its_best_lora_file(early_stopped, tiny_run, tmp_path):
    run_dir, _ = early_stopped
    result = run_cli("generate", str(tiny_run), "a handwritten digit one", "--steps", "2",
                     "--lora", f"{run_dir}:0.5", "--out", str(tmp_path / "g"))
    assert result.returncode == 0, result.stderr
    assert (run_dir / "export" / "step-000002-ema-lora.safetensors").is_file()  # the best step's, written once
    assert list((tmp_path / "g").glob("*.png"))
