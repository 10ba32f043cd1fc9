"""The run-directory lock, against real holder processes: refused at once, stale locks taken over."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys

import pytest

from stablediff.checkpoint.lock import LOCK_NAME, RunDirInUse, RunLock, has_run_content

# A process that takes the lock, optionally forks a child that outlives it, says so, and sleeps.
HOLDER = """
import os, sys, time
from stablediff.checkpoint.lock import RunLock
RunLock(sys.argv[1]).acquire("test holder")
child = os.fork() if sys.argv[2] == "fork" else 0
if child == 0 and sys.argv[2] == "fork":
    os.write(1, b"child-ready\\n")  # its fork hook has run: the parent may be killed now (one write: lines never mix)
    time.sleep(600)
os.write(1, f"{child}\\n".encode())
time.sleep(600)
"""


def start_holder(run_dir, fork: bool = False) -> tuple[subprocess.Popen, int]:
    """A real process holding run_dir's lock; returns it and the pid of its forked child (0: none)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), "fork" if fork else "-"],
                            stdout=subprocess.PIPE, text=True)
    lines = {proc.stdout.readline().strip() for _ in range(2 if fork else 1)}  # in either order
    lines.discard("child-ready")
    child = int(lines.pop())  # once printed, the lock is held
    return proc, child


@pytest.fixture
def holders():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_the_lock_file_names_the_holder(tmp_path):
    lock = RunLock(tmp_path / "run")
    assert lock.acquire("stablediff train") is None
    holder = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["command"] == "stablediff train" and holder["host"]
    assert dt.datetime.fromisoformat(holder["started"]).tzinfo is not None
    lock.release()


def test_a_second_process_is_refused_naming_pid_host_time_and_command(tmp_path, holders):
    proc, _ = start_holder(tmp_path)
    holders.append(proc)
    with pytest.raises(RunDirInUse) as refused:
        RunLock(tmp_path).acquire("stablediff train")
    message = str(refused.value)
    assert f"run dir {tmp_path} is in use by pid {proc.pid} on " in message
    assert "since " in message and "(test holder)" in message
    assert message.endswith("wait for it or pass another --run-dir")
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid  # the holder's record is kept


def test_a_released_lock_is_taken_again_without_a_stale_warning(tmp_path):
    first = RunLock(tmp_path)
    first.acquire("one")
    first.release()
    assert (tmp_path / LOCK_NAME).read_bytes() == b""
    second = RunLock(tmp_path)
    assert second.acquire("two") is None
    second.release()


def test_the_lock_of_a_sigkilled_holder_is_taken_over_and_names_it(tmp_path, holders):
    proc, _ = start_holder(tmp_path)
    holders.append(proc)
    kill(proc)
    lock = RunLock(tmp_path)
    stale = lock.acquire("stablediff train")
    assert stale is not None and stale.pid == proc.pid and stale.command == "test holder"
    assert stale.gone_from_this_host()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_forked_child_does_not_keep_the_run_locked_after_its_parent_dies(tmp_path, holders):
    proc, child = start_holder(tmp_path, fork=True)
    holders.append(proc)
    try:
        kill(proc)
        lock = RunLock(tmp_path)
        assert lock.acquire("stablediff train").pid == proc.pid  # the child (alive) holds nothing
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_run_dir_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not a directory.*another --run-dir"):
        RunLock(tmp_path / "run").acquire("stablediff train")


def test_an_unreadable_lock_file_counts_as_a_stale_unknown_holder(tmp_path):
    (tmp_path / LOCK_NAME).write_text("{not json")
    lock = RunLock(tmp_path)
    assert "unknown process" in lock.acquire("stablediff train").describe()
    lock.release()


def test_the_lock_and_an_owner_file_alone_are_no_run_content(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire("stablediff train")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "owner.json").write_text("{}")
    assert not has_run_content(tmp_path)
    (tmp_path / "checkpoints" / "manifests").mkdir()
    assert has_run_content(tmp_path)
    lock.release()
