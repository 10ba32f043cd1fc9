"""Crash-campaign modes that SIGKILL a real `stablediff train` and check what it left.

- vae: killed at a random instant of stage 1 (the autoencoder), which saves every few
  steps; the store must verify, `load()` must pick the newest checkpoint without
  skipping one, and the resumed run must end bitwise equal (same chunk hashes) to
  an uninterrupted run.
- rollback: a diverging run (LR 1e4) killed at a random instant after it announced a
  rollback; the newest loadable checkpoint must belong to the rolled-back trajectory
  (never one the rollback abandoned; it resumes with the lowered LR, from its own meta
  or the rollback record), and the resumed run must continue that lineage (its next
  rollback lowers the LR further instead of repeating the first).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

QUIET = ["--set", "train.threads=1", "--set", "train.tensorboard=false"]
VAE_RUN = ["--set", "vae.train_steps=40", "--set", "checkpoint.every_steps=4", "--set", "train.max_steps=4"]
ROLLBACK_RUN = ["--set", "train.learning_rate=1e4", "--set", "train.grad_clip=null", "--set", "train.warmup_steps=0",
                "--set", "train.max_steps=30", "--set", "checkpoint.every_steps=1", "--set", "guard.min_history=2",
                "--set", "guard.max_events=2", "--set", "guard.within_steps=10", "--set", "guard.max_rollbacks=2"]

# The rolled-back run saves every step (~0.15 s on 2 cores), so within a few steps its own checkpoints replace
# the abandoned ones: kills aim into the first half second after the rollback, where lineage matters.
ROLLBACK_KILL_S = 0.5


@dataclass
class ModeTotals:
    kills: int = 0
    kills_before_target: int = 0  # the process ended before the kill (counted, not a finding)
    torn_selected: int = 0
    abandoned_selected: int = 0
    resume_mismatches: int = 0
    failures: list[str] = field(default_factory=list)


def train_cmd(run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "stablediff", "train", "tiny", "--run-dir", str(run_dir), *QUIET, *extra]


def run_to_end(run_dir: Path, extra: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(run_dir, extra), capture_output=True, text=True, timeout=900)


def kill_after(run_dir: Path, extra: list[str], pattern: str, delay_s: float) -> tuple[bool, list[str]]:
    """Start a run, SIGKILL its process group `delay_s` after a stderr line matches `pattern`.
    Returns (killed, stderr lines seen)."""
    proc = subprocess.Popen(train_cmd(run_dir, extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line.rstrip())
            if re.search(pattern, line):
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while not seen.wait(0.05):
        if proc.poll() is not None:
            reader.join()
            return False, lines
    time.sleep(delay_s)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join()
    return killed, lines


def check_store(run_dir: Path, totals: ModeTotals, where: str):
    """Deep verify; every checkpoint loads; load() picks the newest without skipping. Returns load() or None."""
    from stablediff.checkpoint import CheckpointError, CheckpointStore

    store = CheckpointStore(run_dir / "checkpoints")
    if not store.steps():
        return None
    report = store.verify(deep=True)
    if not report.ok:
        totals.torn_selected += 1
        totals.failures.append(f"{where}: verify failed: {report.lines()[:3]}")
    try:
        newest = store.load()
    except CheckpointError as exc:
        totals.failures.append(f"{where}: nothing loads: {exc}")
        return None
    live = [s.step for s in store.list() if s.valid]  # abandoned by a rollback: never the newest
    if newest.step != max(live) or newest.skipped:
        totals.torn_selected += 1
        totals.failures.append(f"{where}: load() chose {newest.step}, skipped {[s.step for s in newest.skipped]}")
    return newest


def abandoned_selected(run_dir: Path, newest) -> str | None:
    """Why `newest` belongs to the diverged trajectory, or None: it is marked abandoned, or it predates
    no rollback record and still has the diverged run's LR (an abandoned checkpoint nobody marked)."""
    from stablediff.checkpoint import CheckpointStore, lineage

    store = CheckpointStore(run_dir / "checkpoints")
    if lineage.is_abandoned(lineage.abandoned_index([store]), newest.step, newest.manifest.checksum):
        return f"load() chose step {newest.step}, which a rollback abandoned"
    pending = lineage.pending_rollback(lineage.read_records(store), newest.meta)
    lr_scale = pending.lr_scale if pending else float(newest.meta.get("lr_scale", 1.0))
    if lr_scale > 0.5:
        return f"newest checkpoint {newest.step} resumes with lr_scale {lr_scale} (the diverged trajectory)"
    return None


def final_chunks(run_dir: Path) -> dict[str, list[str]]:
    from stablediff.checkpoint import CheckpointStore

    store = CheckpointStore(run_dir / "checkpoints")
    manifest = store.read_manifest(max(store.steps()))
    return {name: list(entry.chunks) for name, entry in manifest.tensors.items()}


def vae_campaign(kills: int, workdir: Path, rand: random.Random) -> dict:
    totals = ModeTotals()
    reference = workdir / "reference"
    started = time.perf_counter()
    stage1_s = _timed_stage1(reference, VAE_RUN)
    expected = final_chunks(reference)
    left: list[int | None] = []  # per kill, the stage-1 step of the checkpoint it left (None: none yet)
    for kill in range(1, kills + 1):
        run_dir = workdir / f"vae-{kill}"
        killed, _lines = kill_after(run_dir, VAE_RUN, r"stage 1", rand.uniform(0.0, stage1_s))
        totals.kills += killed
        totals.kills_before_target += not killed
        newest = check_store(run_dir, totals, f"kill {kill}")
        left.append(newest.meta.get("vae_step") if newest is not None else None)
        resumed = run_to_end(run_dir, VAE_RUN)
        if resumed.returncode != 0:
            totals.failures.append(f"kill {kill}: resume exited {resumed.returncode}: {resumed.stderr[-500:]}")
        elif final_chunks(run_dir) != expected:
            totals.resume_mismatches += 1
            differing = [k for k, v in final_chunks(run_dir).items() if expected.get(k) != v][:5]
            totals.failures.append(f"kill {kill} (checkpoint {newest.step if newest else None}): resumed run "
                                   f"differs from the uninterrupted one in {differing}")
        _progress("vae", kill, kills, totals, started)
    return {**_as_dict(totals), "stage1_seconds": round(stage1_s, 2), "stage1_step_left_by_each_kill": left,
            "wall_s": round(time.perf_counter() - started)}


def rollback_campaign(kills: int, workdir: Path, rand: random.Random) -> dict:
    totals = ModeTotals()
    started = time.perf_counter()
    for kill in range(1, kills + 1):
        run_dir = workdir / f"rollback-{kill}"
        killed, _lines = kill_after(run_dir, ROLLBACK_RUN, r"rolled back to step", rand.uniform(0.0, ROLLBACK_KILL_S))
        totals.kills += killed
        totals.kills_before_target += not killed
        newest = check_store(run_dir, totals, f"kill {kill}")
        why = abandoned_selected(run_dir, newest) if killed and newest is not None else None
        if why:
            totals.abandoned_selected += 1
            totals.failures.append(f"kill {kill}: {why}")
        if killed:
            resumed = run_to_end(run_dir, ROLLBACK_RUN)
            scales = [r["lr_scale"] for r in _metrics(run_dir) if r.get("event") == "rollback"]
            if scales != sorted(set(scales), reverse=True) or 0.25 not in scales:
                totals.resume_mismatches += 1
                totals.failures.append(f"kill {kill}: rollback LR scales across the resume: {scales} "
                                       f"(exit {resumed.returncode})")
        _progress("rollback", kill, kills, totals, started)
    return {**_as_dict(totals), "wall_s": round(time.perf_counter() - started)}


def _timed_stage1(run_dir: Path, extra: list[str]) -> float:
    """Run the reference to its end; the seconds from its "stage 1" line to the end of stage 1."""
    proc = subprocess.Popen(train_cmd(run_dir, extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marks, tail = {}, []
    for line in proc.stderr:
        tail = [*tail[-20:], line]
        for name, prefix in (("start", "stage 1"), ("end", "autoencoder held-out")):
            if line.startswith(prefix):
                marks.setdefault(name, time.perf_counter())
    if proc.wait() != 0 or len(marks) != 2:
        raise RuntimeError(f"reference run failed: {''.join(tail)}")
    return marks["end"] - marks["start"]


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _as_dict(totals: ModeTotals) -> dict:
    return {"kills": totals.kills, "kills_before_target": totals.kills_before_target,
            "torn_selected": totals.torn_selected, "abandoned_selected": totals.abandoned_selected,
            "resume_mismatches": totals.resume_mismatches, "failure_examples": totals.failures[:20]}


def _progress(mode: str, kill: int, kills: int, totals: ModeTotals, started: float) -> None:
    print(f"{mode}: {kill}/{kills} runs, {len(totals.failures)} findings, {time.perf_counter() - started:.0f} s",
          flush=True)
