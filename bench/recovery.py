"""Recovery: time from SIGKILL to the first resumed training step, split into its parts.

    .venv/bin/python bench/recovery.py [--config digits] [--trials 3]

Starts `stablediff train`, waits for a checkpoint, SIGKILLs it, starts it again and
reads the "resumed" record the run writes to metrics.jsonl. Phases:
  process start   kill -> the new process is launched
  imports         launch -> the run begins (interpreter, torch, diffusers imports, config)
  manifest scan   listing the store's manifests
  load + verify   reading the newest checkpoint, every chunk hashed against its name
  rebuild         data, text encoder, models, latent encoding, state restored
  first step      the first resumed training step
Writes bench/results/recovery-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, write_result  # bench/ is on sys.path when a script runs

PHASES = [("process start", "kill", "spawned"), ("imports", "spawned", "run_start"),
          ("manifest scan", "run_start", "scanned"), ("load + verify", "scanned", "loaded"),
          ("rebuild", "loaded", "rebuilt"), ("first step", "rebuilt", "first_step")]


def launch(run_dir: Path, config: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "stablediff", "train", config, "--run-dir", str(run_dir),
            "--set", "train.max_steps=100000", "--set", "checkpoint.every_steps=10"]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_checkpoint(run_dir: Path, after: int, timeout: float = 900) -> None:
    manifests = run_dir / "checkpoints" / "manifests"
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.stem) for p in manifests.glob("*.json")] if manifests.is_dir() else []
        if steps and max(steps) > after:
            return
        time.sleep(0.2)
    raise TimeoutError("no checkpoint appeared")


def resumed_record(run_dir: Path, timeout: float = 900) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()[::-1]:
            record = json.loads(line)
            if record.get("event") == "resumed":
                return record
        time.sleep(0.2)
    raise TimeoutError("the run did not resume")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    trials = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        proc = launch(run_dir, args.config)
        for _ in range(args.trials):
            wait_for_checkpoint(run_dir, after=10)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kill = time.time()
            (run_dir / "metrics.jsonl").write_text("")
            spawned = time.time()
            proc = launch(run_dir, args.config)
            record = resumed_record(run_dir)
            marks = {"kill": kill, "spawned": spawned, **{k[2:]: v for k, v in record.items() if k.startswith("t_")}}
            trials.append({name: marks[b] - marks[a] for name, a, b in PHASES} | {"step": record["step"]})
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    mean = {name: sum(t[name] for t in trials) / len(trials) for name, _, _ in PHASES}
    total = sum(mean.values())
    for name, value in mean.items():
        print(f"{name:16}{value:8.2f} s {value / total:6.1%}")
    print(f"{'total':16}{total:8.2f} s  (mean of {len(trials)} kills, config {args.config})")
    result = {"config": args.config, "trials": trials, "mean_s": mean, "total_s": total}
    write_result("recovery", result)


if __name__ == "__main__":
    main()
