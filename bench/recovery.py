"""Recovery: time from relaunch to the first resumed training step, split into its parts.

    .venv/bin/python bench/recovery.py [--config digits] [--trials 3]

Starts `stablediff train`, waits for a checkpoint, SIGKILLs it, starts it again and
times the new process from outside: when it is launched, when it says "resumed from
step N" on stderr, when it says "stage 2: ..." (ready to train), and when the
"resumed" record of its first step appears in metrics.jsonl. Phases:
  start-up        launch -> "resumed from": interpreter, imports, config, manifest scan, load + verify
    manifest scan   listing the store's manifests          } timed in this process on the same
    load + verify   the newest checkpoint, every chunk hashed } checkpoint, after the kill
  rebuild         data, text encoder, models, latent encoding, state restored, validation set
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
import threading
import time
from pathlib import Path

from _common import REPO, write_result  # bench/ is on sys.path when a script runs

PHASES = [("start-up", "spawned", "resumed"), ("rebuild", "resumed", "ready"), ("first step", "ready", "first_step")]
# What the run prints when each mark is reached (the start of a stderr line).
SAID = {"resumed": "resumed from step", "ready": "stage 2:"}


class Run:
    """A `stablediff train` process and the times its stderr lines arrived."""

    def __init__(self, run_dir: Path, config: str) -> None:
        args = [sys.executable, "-m", "stablediff", "train", config, "--run-dir", str(run_dir),
                "--set", "train.max_steps=100000", "--set", "checkpoint.every_steps=10"]
        self.marks = {"spawned": time.time()}
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:  # read to the end: a full pipe would block the run
            for mark, start in SAID.items():
                if line.startswith(start):
                    self.marks.setdefault(mark, time.time())

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join()


def wait_for_checkpoint(run_dir: Path, after: int, timeout: float = 900) -> None:
    manifests = run_dir / "checkpoints" / "manifests"
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.stem) for p in manifests.glob("*.json")] if manifests.is_dir() else []
        if steps and max(steps) > after:
            return
        time.sleep(0.2)
    raise TimeoutError("no checkpoint appeared")


def wait_for_resumed_record(run: Run, run_dir: Path, timeout: float = 900) -> dict:
    """The run's "resumed" record, with the time it was first seen (polled every 10 ms)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run_dir / "metrics.jsonl"
        for line in (metrics.read_text().splitlines() if metrics.is_file() else []):
            record = json.loads(line) if line.endswith("}") else {}  # a line being written is skipped
            if record.get("event") == "resumed":
                run.marks["first_step"] = time.time()
                return record
        if run.proc.poll() is not None:
            raise RuntimeError(f"the run exited with status {run.proc.returncode} before resuming")
        time.sleep(0.01)
    raise TimeoutError("the run did not resume")


def time_scan_and_load(run_dir: Path) -> dict[str, float]:
    """What the run's find_resume does first, timed here on the same store."""
    from stablediff.checkpoint import CheckpointStore

    CheckpointStore(run_dir / "checkpoints").load()  # untimed: the imports a first load does (torch, ...)
    store = CheckpointStore(run_dir / "checkpoints")  # a new store: it knows no chunk yet, so it hashes each
    started = time.perf_counter()
    store.steps()
    scanned = time.perf_counter()
    store.load()
    return {"manifest scan": scanned - started, "load + verify": time.perf_counter() - scanned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    trials = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        run = Run(run_dir, args.config)
        for _ in range(args.trials):
            wait_for_checkpoint(run_dir, after=10)
            run.kill()
            inside = time_scan_and_load(run_dir)
            (run_dir / "metrics.jsonl").write_text("")
            run = Run(run_dir, args.config)
            record = wait_for_resumed_record(run, run_dir)
            trials.append({name: run.marks[b] - run.marks[a] for name, a, b in PHASES} | inside
                          | {"step": record["step"]})
        run.kill()
    names = [name for name, _, _ in PHASES] + ["manifest scan", "load + verify"]
    mean = {name: sum(t[name] for t in trials) / len(trials) for name in names}
    total = sum(mean[name] for name, _, _ in PHASES)
    for name in names:
        indent = "  " if name in ("manifest scan", "load + verify") else ""
        print(f"{indent + name:16}{mean[name]:8.2f} s {mean[name] / total:6.1%}")
    print(f"{'total':16}{total:8.2f} s  (launch -> first resumed step, mean of {len(trials)} kills, "
          f"config {args.config})")
    write_result("recovery", {"config": args.config, "trials": trials, "mean_s": mean, "total_s": total})


if __name__ == "__main__":
    main()
