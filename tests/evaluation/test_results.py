"""eval.json's results: cached by (checkpoint identity, metric, settings), written without losing other
entries, and the best chosen in each metric's own direction (METRIC_MODES)."""

from __future__ import annotations

import json

from stablediff.evaluation.registry import MetricResult
from stablediff.evaluation.results import CHECKPOINTS, best_mark, cached_result, computed_metrics, record_results
from stablediff.io.run_files import read_eval, update_eval

SETTINGS = {"num_samples": 20, "seed": 1000}


def result(name: str, value: float, settings: dict = SETTINGS) -> MetricResult:
    return MetricResult(name, value, None, 20, 1.5, dict(settings), {"feature_dim": 64})


def test_a_result_is_reused_only_for_the_same_checkpoint_and_settings(tmp_path):
    record_results(tmp_path, CHECKPOINTS, "100", "hash-a", {"fd": result("fd", 3.0)})
    data = read_eval(tmp_path)
    assert cached_result(data, CHECKPOINTS, "100", "hash-a", "fd", SETTINGS) == result("fd", 3.0)
    assert cached_result(data, CHECKPOINTS, "100", "hash-b", "fd", SETTINGS) is None  # the step was saved again
    assert cached_result(data, CHECKPOINTS, "100", "hash-a", "fd", {**SETTINGS, "seed": 1}) is None
    assert cached_result(data, CHECKPOINTS, "100", "hash-a", "kid", SETTINGS) is None
    assert cached_result(data, CHECKPOINTS, "200", "hash-a", "fd", SETTINGS) is None


def test_writing_keeps_the_best_mark_other_checkpoints_and_other_metrics(tmp_path):
    update_eval(tmp_path, best={"step": 100, "metric": "val_loss", "mode": "min", "value": 0.5})
    record_results(tmp_path, CHECKPOINTS, "200", "h200", {"fd": result("fd", 4.0)})
    record_results(tmp_path, CHECKPOINTS, "100", "h100", {"fd": result("fd", 3.0)})
    record_results(tmp_path, CHECKPOINTS, "100", "h100", {"kid": result("kid", 0.1)})
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["best"]["metric"] == "val_loss"
    assert list(data["checkpoints"]) == ["100", "200"]  # in step order
    assert set(data["checkpoints"]["100"]["metrics"]) == {"fd", "kid"}
    assert data["checkpoints"]["100"]["checkpoint"] == "h100"
    assert data["checkpoints"]["100"]["metrics"]["fd"] == {"value": 3.0, "spread": None, "count": 20,
                                                           "seconds": 1.5, "settings": SETTINGS, "feature_dim": 64}


def test_a_checkpoint_saved_again_loses_the_results_of_the_old_one(tmp_path):
    record_results(tmp_path, CHECKPOINTS, "100", "old", {"fd": result("fd", 3.0), "kid": result("kid", 0.1)})
    record_results(tmp_path, CHECKPOINTS, "100", "new", {"fd": result("fd", 5.0)})
    entry = read_eval(tmp_path)["checkpoints"]["100"]
    assert entry["checkpoint"] == "new" and set(entry["metrics"]) == {"fd"}


def test_the_best_follows_each_metrics_direction_among_current_checkpoints(tmp_path):
    for step, fd, adherence in ((100, 9.0, 0.2), (200, 4.0, 0.9), (300, 4.0, 0.5), (400, 1.0, 1.0)):
        record_results(tmp_path, CHECKPOINTS, str(step), f"h{step}",
                       {"fd": result("fd", fd), "adherence": result("adherence", adherence)})
    data = read_eval(tmp_path)
    current = {100: "h100", 200: "h200", 300: "h300", 400: "replaced"}  # step 400 no longer holds what was scored
    assert best_mark(data, "fd", current) == {"step": 200, "metric": "fd", "mode": "min", "value": 4.0}  # tie: earlier
    assert best_mark(data, "adherence", current) == {"step": 200, "metric": "adherence", "mode": "max", "value": 0.9}
    assert best_mark(data, "bpd", current) is None
    assert computed_metrics(data, current) == {"fd", "adherence"}
    assert computed_metrics(data, {400: "replaced"}) == set()
