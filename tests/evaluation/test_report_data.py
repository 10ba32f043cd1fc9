"""What the report reads from a run's files: curves, metrics, the confusion matrix, grids, config, rejects."""

from __future__ import annotations

import math

from stablediff.evaluation.report_data import gather, loss_curves, metric_points, pick_confusion
from tests.evaluation.hand_run import BEST_STEP, HOSTILE, SAMPLE_STEPS


def test_losses_are_per_stage_with_the_training_loops_loss_as_train_loss(evaluated_run):
    losses = gather(evaluated_run).losses
    assert list(losses) == [("vae", "train_loss"), ("unet", "train_loss"), ("unet", "val_loss")]
    assert losses[("vae", "train_loss")] == [(step, 1.0 / step) for step in range(1, 6)]
    assert [step for step, _ in losses[("unet", "val_loss")]] == [0, 10, 20, 30, 40]


def test_a_nan_step_a_torn_line_and_events_stay_out_of_the_curves(evaluated_run):
    curve = gather(evaluated_run).losses[("unet", "train_loss")]
    assert [step for step, _ in curve] == list(range(0, 41, 2))  # step 41 was NaN, the torn line is step 4's
    assert all(math.isfinite(value) for _, value in curve)


def test_a_step_logged_again_after_a_rollback_counts_once_with_its_last_value():
    records = [{"stage": "unet", "step": 5, "loss": 9.0}, {"event": "rollback", "step": 4},
               {"stage": "unet", "step": 5, "loss": 0.5}, {"stage": "unet", "step": 6, "train_loss": 0.4}]
    assert loss_curves(records) == {("unet", "train_loss"): [(5, 0.5), (6, 0.4)]}


def test_metrics_come_from_eval_json_and_from_train_time_evaluation(evaluated_run):
    metrics = gather(evaluated_run).metrics
    assert list(metrics) == ["val_loss", "fd", "kid", "adherence"]  # METRIC_MODES order
    fd = metrics["fd"]
    assert [(p.step, p.source) for p in fd] == [(10, "eval"), (20, "eval"), (20, "train"), (30, "eval"), (40, "eval")]
    assert (fd[0].value, fd[0].spread, fd[0].count) == (40.0, 0.8, 256)
    assert [p.step for p in metrics["val_loss"] if p.source == "train"] == [0, 10, 20, 30, 40]


def test_only_known_metrics_are_plotted():
    rows = {3: {"metrics": {"fd": {"value": 1.0}, "made_up": {"value": 2.0}, "kid": {"value": "high"}}}}
    points = metric_points([{"stage": "unet", "step": 3, "bogus": 1.0, "adherence": 0.5}], rows)
    assert sorted(points) == ["adherence", "fd"]


def test_the_confusion_matrix_is_the_best_checkpoints(evaluated_run):
    data = gather(evaluated_run)
    assert data.best_step == BEST_STEP and data.confusion.step == BEST_STEP
    assert len(data.confusion.matrix) == 10 and sum(map(sum, data.confusion.matrix)) == 100


def test_without_adherence_at_the_best_step_the_newest_evaluated_matrix_is_shown():
    matrix = [[1, 0], [0, 1]]
    rows = {1: {"metrics": {"adherence": {"value": 1.0, "confusion": matrix}}},
            2: {"metrics": {"adherence": {"value": 1.0, "confusion": matrix}}}, 3: {"metrics": {"fd": {"value": 1.0}}}}
    assert pick_confusion(rows, best_step=3).step == 2
    assert pick_confusion({3: rows[3]}, best_step=3) is None


def test_sample_grids_are_the_step_pngs_in_step_order(evaluated_run):
    assert [step for step, _ in gather(evaluated_run).samples] == list(SAMPLE_STEPS)  # final.png left out


def test_config_and_quarantine_are_read_as_written(evaluated_run):
    data = gather(evaluated_run)
    assert data.config["sample"]["prompts"][1] == HOSTILE and HOSTILE in data.config_text
    assert dict(data.rejects) == {"too_small": 3, "undecodable": 1}
    assert data.reject_examples["undecodable"] == [HOSTILE]


def test_the_data_counts_are_the_newest_starts(evaluated_run):
    assert gather(evaluated_run).counts == {"train_images": 64, "held_out_images": 6}


def test_an_empty_run_directory_names_everything_missing(tmp_path):
    data = gather(tmp_path)
    assert not (data.losses or data.metrics or data.samples or data.rejects) and data.best is None
    assert [item.split(" ")[0] for item in data.missing] == ["metrics.jsonl", "eval.json", "samples/step-*.png",
                                                            "config.yaml"]
