"""Kill the crash-test writer with SIGKILL and check what it left behind.

Shared by tests/checkpoint/test_crash.py and bench/crash_campaign.py.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np

from stablediff.checkpoint import CheckpointError, CheckpointStore, gc

from . import _writer_proc as writer

WRITER = os.path.abspath(writer.__file__)


@dataclass
class KillOutcome:
    steps_present: dict[str, list[int]] = field(default_factory=dict)
    temp_files: int = 0
    torn_selected: int = 0  # a committed manifest whose contents are not what was saved
    failures: list[str] = field(default_factory=list)


def run_and_kill(primary: str, replica: str, rand: random.Random, max_delay_s: float = 0.5) -> None:
    """Start the writer, let it save for a random moment, then SIGKILL it."""
    proc = subprocess.Popen(
        [sys.executable, WRITER, primary, replica], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"writer did not start: {line!r} {proc.stderr.read()}")
        try:
            proc.wait(timeout=rand.uniform(0.0, max_delay_s))
            raise RuntimeError(f"writer exited on its own: {proc.stderr.read()}")
        except subprocess.TimeoutExpired:
            pass
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def check_after_kill(primary_dir: str, replica_dir: str) -> KillOutcome:
    """Every manifest present loads, verifies and holds exactly what was saved; then a save works."""
    outcome = KillOutcome()
    primary, replica = writer.open_stores(primary_dir, replica_dir)
    for store in (primary, replica):
        outcome.steps_present[store.location] = store.steps()
        outcome.temp_files += store.verify().temp_files
        _check_store(store, outcome)
    _check_next_save(primary, outcome)
    return outcome


def _check_store(store: CheckpointStore, outcome: KillOutcome) -> None:
    report = store.verify(deep=True)
    if not report.ok:
        outcome.failures.append(f"{store.location}: verify failed: {report.lines()}")
    for step in store.steps():
        try:
            loaded = store.load(step)
        except CheckpointError as exc:
            outcome.failures.append(f"{store.location}: step {step} does not load: {exc}")
            continue
        if not _matches(loaded, step):
            outcome.torn_selected += 1
            outcome.failures.append(f"{store.location}: step {step} loads but holds other data")
    if store.steps():
        newest = store.load()
        if newest.step != max(store.steps()) or newest.skipped:
            outcome.failures.append(f"{store.location}: load() chose {newest.step}, skipped {newest.skipped}")


def _matches(loaded, step: int) -> bool:
    expected = writer.expected_state(step)
    same = all(np.array_equal(loaded.tensors[k].numpy(), v) for k, v in expected.items())
    return same and loaded.meta == writer.expected_meta(step) and loaded.metrics["val_loss"] == writer.val_loss(step)


def _check_next_save(primary: CheckpointStore, outcome: KillOutcome) -> None:
    step = max(primary.steps(), default=0) + 1
    try:
        primary.save(step, writer.expected_state(step), writer.expected_meta(step), {"val_loss": writer.val_loss(step)})
        if not _matches(primary.load(), step):
            outcome.failures.append(f"save after kill: step {step} reads back wrong")
        gc(primary, grace_s=0)
        report = primary.verify(deep=True)
        if not report.ok or report.temp_files:
            outcome.failures.append(f"after gc: {report.lines()}")
    except Exception as exc:  # any failure here is a finding, reported by the caller
        outcome.failures.append(f"save after kill failed: {exc!r}")
