"""A run directory built by hand from real files, for the report's tests (no training needed).

`build_evaluated_run` makes what a trained and evaluated run holds: metrics.jsonl with both stages' losses,
validation, train-time evaluation, events, a NaN step and a torn last line; eval.json in the format
`stablediff eval` writes (best: step 30 by fd); a sample grid per checkpoint; config.yaml and
quarantine.jsonl. Captions, config values and quarantine keys carry HOSTILE markup.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

HOSTILE = '<script>alert("x")</script>'
EVAL_STEPS = (10, 20, 30, 40)
BEST_STEP = 30
SAMPLE_STEPS = (10, 20, 30, 40)


def _confusion(step: int) -> list[list[int]]:
    """Ten prompts per digit; more of them read right as training goes on."""
    hits = min(10, step // 5 + 2)
    return [[hits if column == row else (10 - hits if column == (row + 1) % 10 else 0) for column in range(10)]
            for row in range(10)]


def _eval_json() -> dict:
    checkpoints = {}
    for step in EVAL_STEPS:
        adherence = sum(_confusion(step)[d][d] for d in range(10)) / 100
        fd = {10: 40.0, 20: 25.0, 30: 12.5, 40: 14.0}[step]
        checkpoints[str(step)] = {"checkpoint": f"ckpt-{step:07d}", "metrics": {
            "val_loss": {"value": 0.5 - step / 200, "spread": 0.01, "count": 64, "seconds": 0.4, "settings": {}},
            "fd": {"value": fd, "spread": 0.8, "count": 256, "seconds": 3.1, "settings": {"features": "digits"}},
            "kid": {"value": fd / 1000, "spread": 0.002, "count": 256, "seconds": 3.1, "settings": {}},
            "adherence": {"value": adherence, "spread": 0.03, "count": 100, "seconds": 1.2, "settings": {},
                          "precision": adherence, "recall": adherence, "f1": adherence, "per_class": {},
                          "confusion": _confusion(step)},
        }}
    return {"best": {"step": BEST_STEP, "metric": "fd", "mode": "min", "value": 12.5}, "checkpoints": checkpoints}


def _metrics_lines() -> list[str]:
    records = [{"event": "data", "source": "builtin:digits", "train_images": 60, "held_out_images": 6}]
    records += [{"stage": "vae", "step": step, "loss": 1.0 / step} for step in range(1, 6)]
    records.append({"stage": "vae", "held_out_mse": 0.01, "held_out_psnr": 20.0})
    for step in range(0, 41, 2):
        records.append({"stage": "unet", "step": step, "loss": 1.0 - step / 50, "grad_norm": 1.0, "lr": 1e-4})
        if step % 10 == 0:
            records.append({"stage": "unet", "step": step, "val_loss": 0.9 - step / 60})
    records.append({"event": "data", "source": "builtin:digits", "train_images": 64, "held_out_images": 6})
    records.append({"event": "resumed", "step": 20})
    records.append({"stage": "unet", "step": 20, "fd": 26.0, "kid": 0.027, "adherence": 0.6})
    lines = [json.dumps(record) for record in records]
    lines.append(json.dumps({"stage": "unet", "step": 41, "loss": float("nan"), "skipped": "non_finite_loss"}))
    return lines


def _config_yaml() -> str:
    return ("# the resolved config of this run, in effect from step 0\n"
            f"data:\n  source: builtin:digits\n  resolution: 32\n  held_out_fraction: 0.05\n"
            f"sample:\n  prompts:\n  - a handwritten digit one\n  - '{HOSTILE}'\n"
            f"  per_prompt: 2\n  seed: 7\n"
            f"train:\n  max_steps: 40\nnote: '{HOSTILE}'\n")


def _quarantine_lines() -> list[str]:
    rows = [{"key": f"img{i}.png", "origin": "folder", "reason": "too_small", "detail": "4x4"} for i in range(3)]
    rows.append({"key": HOSTILE, "origin": "folder", "reason": "undecodable", "detail": "not an image"})
    return [json.dumps(row) for row in rows]


def build_evaluated_run(run_dir: Path) -> Path:
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(_metrics_lines()) + '\n{"stage": "unet", "step": 4')
    (run_dir / "eval.json").write_text(json.dumps(_eval_json(), indent=2))
    for index, step in enumerate(SAMPLE_STEPS):  # a 2x2 grid of 32px cells, a colour per checkpoint
        Image.new("RGB", (64, 64), (40 + 50 * index, 200 - 40 * index, 90)).save(
            run_dir / "samples" / f"step-{step:07d}.png")
    (run_dir / "samples" / "final.png").write_bytes(b"")  # not a step grid: left out
    (run_dir / "config.yaml").write_text(_config_yaml())
    (run_dir / "quarantine.jsonl").write_text("\n".join(_quarantine_lines()) + "\n")
    return run_dir

