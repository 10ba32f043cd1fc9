"""Evaluation during training (train.eval_every): logged, checkpointed, ranked, stopped on, and harmless.

Tiny real runs in-process (run_training, as `stablediff train` calls it): the tiny recipe on
builtin:digits, ten generated images per evaluation (one per digit).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from stablediff.checkpoint import CheckpointStore
from stablediff.config import load_config
from stablediff.evaluation.context import EvalSettings
from stablediff.evaluation.registry import metric_settings
from stablediff.evaluation.results import CHECKPOINTS, cached_result
from stablediff.io.run_files import read_eval
from stablediff.training.run import run_training

pytestmark = pytest.mark.slow
QUIET = ["train.threads=1", "train.tensorboard=false"]
EVAL = ["train.eval_every=2", "train.eval_metrics=[fd,kid,adherence]", "train.eval_samples=10"]


def train(run_dir: Path, overrides: list[str]):
    return run_training(load_config("tiny", [*QUIET, *overrides]), run_dir)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_records(run_dir: Path, name: str = "fd") -> list[dict]:
    return [r for r in records(run_dir) if name in r]


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return CheckpointStore(run_dir / "checkpoints").load().tensors


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("evaluated") / "run"
    train(run_dir, [*EVAL, "train.tensorboard=true"])
    return run_dir


def test_a_run_that_evaluates_ends_bitwise_equal_to_one_that_does_not(evaluated, tmp_path):
    plain = tmp_path / "plain"
    train(plain, [])
    with_eval, without = final_tensors(evaluated), final_tensors(plain)
    assert with_eval.keys() == without.keys()
    assert [n for n in with_eval if not torch.equal(with_eval[n], without[n])] == []  # weights, EMA, optimizer, RNG


def test_each_evaluation_is_one_metrics_record_and_a_tensorboard_scalar(evaluated):
    logged = eval_records(evaluated)
    assert [r["step"] for r in logged] == [2, 4]
    for record in logged:
        assert record["stage"] == "unet" and record["fd"] > 0 and record["fd_count"] == 10
        assert record["kid_spread"] > 0 and 0 <= record["adherence"] <= 1 and record["adherence_count"] == 10
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(evaluated / "tb"))
    events.Reload()
    assert {"unet/fd", "unet/kid", "unet/adherence"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("unet/fd")] == [2, 4]


def test_the_checkpoints_of_evaluation_steps_carry_their_metrics(evaluated):
    logged = {r["step"]: r for r in eval_records(evaluated)}
    kept = {s.step: s for s in CheckpointStore(evaluated / "checkpoints").list()}
    assert {2, 4} <= set(kept)  # a checkpoint is forced at each evaluation step
    for step in (2, 4):
        assert kept[step].metric("fd") == logged[step]["fd"]
        assert kept[step].metric("adherence") == logged[step]["adherence"]
    assert kept[0].metric("fd") is None  # not evaluated: carries none (no stale values)


def test_each_evaluation_rewrites_the_report_and_saves_its_images_as_the_steps_grid(evaluated):
    from PIL import Image

    for step in (2, 4):
        with Image.open(evaluated / "samples" / f"step-{step:07d}.png") as grid:
            assert grid.size == (16, 16 * 10)  # tiny's 16 px digits: ten rows (one per digit) of one image
    assert (evaluated / "plots" / "metric-fd.png").is_file()  # drawn from the evaluations' numbers
    assert "data:image/png;base64," in (evaluated / "report.html").read_text()


def test_eval_json_holds_the_results_as_stablediff_eval_would_and_finds_them_cached(evaluated):
    config = load_config("tiny", [*QUIET, *EVAL])
    data, store = read_eval(evaluated), CheckpointStore(evaluated / "checkpoints")
    for step in (2, 4):
        identity = store.read_manifest(step).checksum
        for name in ("fd", "kid", "adherence"):
            settings = metric_settings(name, EvalSettings(num_samples=10), config)
            hit = cached_result(data, CHECKPOINTS, str(step), identity, name, settings)
            assert hit is not None, (step, name)
            logged = next(r for r in eval_records(evaluated) if r["step"] == step)
            assert hit.value == logged[name] and hit.count == 10


def test_early_stopping_on_an_eval_metric_stops_and_keep_best_ranks_by_checkpoint_best_metric(tmp_path):
    run_dir = tmp_path / "run"
    result = train(run_dir, ["train.max_steps=40", "train.eval_every=1", "train.eval_metrics=[fd,adherence]",
                             "train.eval_samples=10", "early_stopping.metric=adherence", "early_stopping.patience=2",
                             "early_stopping.min_delta=1.0",  # adherence is in [0, 1]: only the first counts
                             "checkpoint.best_metric=fd", "checkpoint.keep_last=2", "checkpoint.keep_best=1",
                             "guard.enabled=false"])
    assert result.stop_reason is not None and "adherence" in result.stop_reason
    stops = [r for r in records(run_dir) if r.get("event") == "early_stopping"]
    assert [(r["step"], r["best_step"]) for r in stops] == [(3, 1)]  # mode max, from METRIC_MODES
    fd = {r["step"]: r["fd"] for r in eval_records(run_dir)}
    assert sorted(fd) == [1, 2, 3]
    best_fd = min(fd, key=lambda step: (fd[step], step))
    mark = read_eval(run_dir)["best"]
    assert mark == {"step": best_fd, "metric": "fd", "mode": "min", "value": fd[best_fd]}
    assert set(CheckpointStore(run_dir / "checkpoints").steps()) == {2, 3, best_fd}


def test_a_resume_after_an_evaluation_logs_each_evaluation_once(evaluated, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(evaluated, run_dir)
    CheckpointStore(run_dir / "checkpoints").delete_manifest(4)  # killed before step 4's checkpoint committed
    train(run_dir, [*EVAL, "train.tensorboard=true"])  # resumes at step 2, evaluates step 4 again
    assert [r["step"] for r in eval_records(run_dir)] == [2, 4]
    steps = [r["step"] for r in records(run_dir) if r.get("stage") == "unet" and "loss" in r]
    assert len(steps) == len(set(steps))
    identity = CheckpointStore(run_dir / "checkpoints").read_manifest(4).checksum
    assert read_eval(run_dir)[CHECKPOINTS]["4"]["checkpoint"] == identity


def test_a_lora_fine_tune_evaluates_too_and_export_best_follows_the_mark(evaluated, tmp_path):
    from stablediff.finetune.plan import plan_finetune
    from stablediff.finetune.run import run_finetune
    from stablediff.models.run_export import best_step

    run_dir = tmp_path / "ft"
    config = load_config("tiny", [*QUIET, *EVAL, "train.eval_metrics=[fd]", f"finetune.base={evaluated}",
                                  "finetune.lora.rank=1", "checkpoint.best_metric=fd"])
    run_finetune(plan_finetune(config, run_dir), run_dir)
    fd = {r["step"]: r["fd"] for r in eval_records(run_dir)}
    assert sorted(fd) == [2, 4]
    best = min(fd, key=lambda step: (fd[step], step))
    assert read_eval(run_dir)["best"]["step"] == best
    assert best_step(CheckpointStore(run_dir / "checkpoints"), run_dir) == best  # what export/generate --best take


def test_a_sigterm_during_an_evaluation_keeps_its_results_in_eval_json_for_the_resume(monkeypatch, tmp_path):
    # The signal arrives while step 2 is being evaluated; the run stops at that step's boundary with an
    # emergency checkpoint, and the resume starts after step 2: it never evaluates step 2 again.
    import os
    import signal

    from stablediff.training.eval_step import StepEvaluator
    from stablediff.training.interrupt import TrainingInterrupted

    original = StepEvaluator.evaluate

    def signalled(self, stage, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to the real handler; only the instant is chosen
        return original(self, stage, step)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(StepEvaluator, "evaluate", signalled)
    with pytest.raises(TrainingInterrupted):
        train(run_dir, EVAL)
    store = CheckpointStore(run_dir / "checkpoints")
    assert max(store.steps()) == 2
    assert read_eval(run_dir)[CHECKPOINTS]["2"]["checkpoint"] == store.read_manifest(2).checksum
    monkeypatch.setattr(StepEvaluator, "evaluate", original)
    train(run_dir, EVAL)
    assert [r["step"] for r in eval_records(run_dir)] == [2, 4]
    assert set(read_eval(run_dir)[CHECKPOINTS]) == {"2", "4"}
