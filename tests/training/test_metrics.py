"""metrics.jsonl after a resume reads as if the run had never stopped: each step once."""

import json

from stablediff.training.metrics import MetricsLog


def write(path, *records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rewind_drops_the_records_of_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write(path, {"stage": "vae", "step": 5, "loss": 1}, {"stage": "vae", "held_out_mse": 0.1},
          *({"stage": "unet", "step": s, "loss": s} for s in range(1, 8)))
    assert MetricsLog(path).rewind("unet", 4) == 3
    assert [(r["stage"], r.get("step")) for r in read(path)] == [
        ("vae", 5), ("vae", None), ("unet", 1), ("unet", 2), ("unet", 3), ("unet", 4)]


def test_the_vae_stage_is_before_any_unet_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write(path, {"stage": "vae", "step": 600}, {"stage": "unet", "step": 1})
    MetricsLog(path).rewind("unet", 0)
    assert read(path) == [{"stage": "vae", "step": 600}]


def test_a_resumed_event_written_after_its_first_step_goes_with_that_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first_try = [{"stage": "unet", "step": 10}, {"event": "config_changed", "step": 10}]
    write(path, *first_try, {"stage": "unet", "step": 11}, {"event": "resumed", "step": 10},
          {"stage": "unet", "step": 12})
    MetricsLog(path).rewind("unet", 10)  # killed again before the next checkpoint
    assert read(path) == first_try


def test_file_order_decides_so_a_rollbacks_earlier_trajectory_stays(tmp_path):
    path = tmp_path / "metrics.jsonl"
    diverged = [{"stage": "unet", "step": s} for s in (18, 19, 20, 21, 22)]
    write(path, *diverged, {"event": "rollback", "step": 18}, {"stage": "unet", "step": 19},
          {"stage": "unet", "step": 20}, {"stage": "unet", "step": 21})
    MetricsLog(path).rewind("unet", 20)
    assert read(path) == [*diverged, {"event": "rollback", "step": 18}, {"stage": "unet", "step": 19},
                          {"stage": "unet", "step": 20}]


def test_no_checkpoint_means_the_run_starts_over_and_so_does_its_log(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write(path, {"stage": "vae", "step": 3})
    MetricsLog(path).rewind(None, None)
    assert path.read_text() == ""


def test_a_torn_last_line_is_cut_and_a_complete_log_is_left_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write(path, {"stage": "unet", "step": 1})
    before = path.stat()
    assert MetricsLog(path).rewind("unet", 1) == 0
    assert path.stat().st_mtime_ns == before.st_mtime_ns and path.stat().st_ino == before.st_ino
    with path.open("a") as fh:
        fh.write('{"stage": "unet", "st')  # SIGKILL mid-append
    MetricsLog(path).rewind("unet", 1)
    log = MetricsLog(path)
    log.write(stage="unet", step=2)
    assert [r["step"] for r in read(path)] == [1, 2]


def test_a_missing_log_is_fine(tmp_path):
    assert MetricsLog(tmp_path / "metrics.jsonl").rewind("unet", 3) == 0
