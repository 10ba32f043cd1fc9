"""`stablediff eval` on a tiny trained run, as a user runs it: eval.json per checkpoint, the best marked and
followed by `ckpt export --best` and `generate --best`, a second run served from the cache, a training run's
lock respected, and one-paragraph errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from stablediff.checkpoint import CheckpointStore
from stablediff.checkpoint.lock import RunLock
from stablediff.models.export_record import exported_step
from stablediff.inference.metadata import bytes_short_hash
from stablediff.run_schema import EMA, METRIC_MODES, unprefixed
from tests.conftest import run_cli

FAST = ["--num-samples", "20", "--sample-steps", "2"]  # 2 images per digit, 2 sampling steps: seconds per checkpoint
DEFAULT_METRICS = ["val_loss", "fd", "kid", "adherence", "bpd"]  # builtin:digits without --clip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run with text-to-image checkpoints at steps 0, 2 and 4; never written by the tests."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    result = run_cli("train", "tiny", "--run-dir", str(run_dir), "--set", "checkpoint.every_steps=2",
                     "--set", "train.threads=1")
    assert result.returncode == 0, result.stderr
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(run_dir, target)
    return target


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    """(run dir, the first `eval`'s result, eval.json as it left it)."""
    run_dir = copy_of(trained, tmp_path_factory.mktemp("evaluated"))
    result = run_cli("eval", str(run_dir), *FAST)
    assert result.returncode == 0, result.stderr
    return run_dir, result, json.loads((run_dir / "eval.json").read_text())


def manifest_checksums(run_dir: Path) -> dict[str, str]:
    store = CheckpointStore(run_dir / "checkpoints")
    return {str(step): store.read_manifest(step).checksum for step in store.steps()}


def ema_unet_hash(run_dir: Path, step: int) -> str:
    """The model hash `generate` writes for a run's checkpoint: its EMA UNet's tensors as safetensors bytes."""
    from safetensors.torch import save

    tensors = CheckpointStore(run_dir / "checkpoints").load(step).tensors
    return bytes_short_hash(save({k: v.contiguous() for k, v in unprefixed(EMA, tensors).items()}))


def test_eval_writes_every_kept_checkpoints_metrics_and_marks_the_best_by_fd(evaluated):
    run_dir, result, data = evaluated
    checkpoints = data["checkpoints"]
    assert list(checkpoints) == ["0", "2", "4"]
    assert {step: entry["checkpoint"] for step, entry in checkpoints.items()} == manifest_checksums(run_dir)
    for entry in checkpoints.values():
        assert list(entry["metrics"]) == DEFAULT_METRICS
        for metric in entry["metrics"].values():
            assert {"value", "spread", "count", "seconds", "settings"} <= metric.keys()
    fd = {int(step): entry["metrics"]["fd"]["value"] for step, entry in checkpoints.items()}
    best = min(fd, key=lambda step: (fd[step], step))
    assert data["best"] == {"step": best, "metric": "fd", "mode": METRIC_MODES["fd"], "value": fd[best]}
    rows = [line.split()[:2] for line in result.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["0", "2", "4"] and rows[[0, 2, 4].index(best)][1] == "*"
    assert f"best: step {best} by fd" in result.stderr


def test_a_second_run_is_served_from_the_cache_with_the_same_numbers(evaluated):
    run_dir, first, data = evaluated
    before = (run_dir / "eval.json").read_bytes()
    again = run_cli("eval", str(run_dir), *FAST)
    assert again.returncode == 0, again.stderr
    assert "computed" not in again.stderr
    assert all(f"step {s}: {', '.join(DEFAULT_METRICS)} cached" in again.stderr for s in (0, 2, 4)), again.stderr
    assert again.stdout == first.stdout and (run_dir / "eval.json").read_bytes() == before


def test_ckpt_export_and_generate_follow_the_mark(trained, tmp_path):
    """Among steps 0 and 2 the mark cannot be step 4, the newest; without a mark (and with no val_loss in the
    checkpoints) --best would have nothing to go by."""
    run_dir = copy_of(trained, tmp_path)
    assert not (run_dir / "eval.json").exists()
    result = run_cli("eval", str(run_dir), "--steps", "0,2", "--metrics", "val_loss", "--best-metric", "val_loss")
    assert result.returncode == 0, result.stderr
    mark = json.loads((run_dir / "eval.json").read_text())["best"]
    assert mark["step"] in (0, 2) and mark["metric"] == "val_loss"
    export = run_cli("ckpt", "export", str(run_dir), "--best", "--format", "diffusers", "--out", str(tmp_path / "best"))
    assert export.returncode == 0, export.stderr
    assert exported_step(tmp_path / "best") == mark["step"]
    images = tmp_path / "images"
    generated = run_cli("generate", str(run_dir), "a handwritten digit one", "--best", "--steps", "2", "--out",
                        str(images))
    assert generated.returncode == 0, generated.stderr
    [png] = images.glob("*.png")
    assert f"Model hash: {ema_unet_hash(run_dir, mark['step'])}" in Image.open(png).info["parameters"]


@pytest.fixture(scope="module")
def elsewhere(evaluated, tmp_path_factory):
    """While a trainer holds the run's lock: `eval` into the run (refused), and into --out DIR with other
    settings, where DIR/eval.json starts as a copy of the run's (its cache)."""
    run_dir = evaluated[0]
    before = (run_dir / "eval.json").read_bytes()
    out = tmp_path_factory.mktemp("elsewhere")
    (out / "eval.json").write_bytes(before)
    lock = RunLock(run_dir)
    lock.acquire("stablediff train tiny")
    try:
        refused = run_cli("eval", str(run_dir), *FAST, "--steps", "2")
        changed = run_cli("eval", str(run_dir), "--steps", "4", "--metrics", "kid,val_loss", "--num-samples", "10",
                          "--sample-steps", "2", "--best-metric", "kid", "--out", str(out), "--json")
    finally:
        lock.release()
    assert changed.returncode == 0, changed.stderr
    return before, refused, changed, json.loads((out / "eval.json").read_text())


def test_a_run_being_trained_is_refused_and_out_elsewhere_reads_it_without_writing(evaluated, elsewhere):
    before, refused, _, out_data = elsewhere
    assert refused.returncode == 1 and "stablediff train tiny" in refused.stderr and "--out DIR" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert (evaluated[0] / "eval.json").read_bytes() == before
    assert out_data["best"]["metric"] == "kid"


def test_changed_settings_recompute_only_what_they_change(evaluated, elsewhere):
    data = evaluated[2]
    _, _, changed, after = elsewhere
    assert "step 4: kid computed; val_loss cached" in changed.stderr  # val_loss does not depend on the samples
    kid = after["checkpoints"]["4"]["metrics"]["kid"]
    assert kid["settings"]["num_samples"] == 10 and kid["count"] == 10
    assert kid["value"] != data["checkpoints"]["4"]["metrics"]["kid"]["value"]
    assert after["checkpoints"]["2"] == data["checkpoints"]["2"]
    assert after["checkpoints"]["4"]["metrics"]["fd"] == data["checkpoints"]["4"]["metrics"]["fd"]
    printed = json.loads(changed.stdout)
    assert printed["results"]["4"]["kid"] == kid and printed["best"] == after["best"]


def test_an_exported_model_scores_as_the_checkpoint_it_was_exported_from(evaluated, tmp_path):
    run_dir, _, data = evaluated
    result = run_cli("eval", str(run_dir / "export" / "diffusers"), *FAST, "--metrics", "val_loss,fd",
                     "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    [entry] = json.loads((tmp_path / "eval.json").read_text())["models"].values()
    for name in ("val_loss", "fd"):
        assert entry["metrics"][name]["value"] == data["checkpoints"]["4"]["metrics"][name]["value"], name


@pytest.mark.parametrize("args, words", [
    (["--metrics", "fd,fid"], ["unknown metric 'fid'", "val_loss, fd, kid"]),
    (["--steps", "3"], ["--steps 3", "the kept steps are 0, 2, 4"]),
    (["--metrics", "clip"], ["--clip FOLDER"]),
    (["--best-metric", "loss"], ["--best-metric", "'loss'"]),
])
def test_wrong_requests_get_one_paragraph_errors(trained, args, words):
    result = run_cli("eval", str(trained), *args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and all(w in result.stderr for w in words), result.stderr


def test_a_run_directory_without_checkpoints_says_to_train_it_first(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    result = run_cli("eval", str(tmp_path))
    assert result.returncode == 1 and "no checkpoints yet" in result.stderr and "stablediff train" in result.stderr
