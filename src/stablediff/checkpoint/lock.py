"""The run-directory lock: one writing process per run directory (DESIGN.md, invariant 8).

`RUN_DIR/.lock` is held with an exclusive `flock` for as long as a command
writes the run (train, demo, data cache, ckpt repair, ckpt gc) and holds JSON
naming its holder, {pid, host, started, command}, so that a refused second
process can say who has it. A refusal never waits.

The kernel drops a flock when its holder dies, however it dies (SIGKILL, OOM,
power loss of a client of a network filesystem). A free flock over a file that
still names a holder therefore means that holder died without releasing: the
lock is stale and is taken over, and `acquire` returns the old holder so the
caller can warn. A clean release empties the file rather than deleting it:
unlinking a flocked file would let two processes lock two different inodes
under one name.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from stablediff.errors import NotAFolderError, UserError

LOCK_NAME = ".lock"
# A holder writes its JSON right after taking the flock; a refused process that finds
# the file still empty (or being emptied by a release) looks again for this long.
HOLDER_WAIT_S = 1.0
_MAX_LOCK_BYTES = 64 * 1024

# File descriptors of the locks this process holds: a forked child (a data-loading
# worker) closes its copies, so a child that outlives a killed parent cannot keep the
# run locked. Closing a copy does not release the parent's lock.
_held_fds: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_held_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a run directory's lock."""

    pid: int
    host: str
    started: str  # ISO 8601 with the holder's UTC offset
    command: str

    @classmethod
    def current(cls, command: str) -> LockHolder:
        started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        return cls(os.getpid(), socket.gethostname(), started, command)

    @classmethod
    def parse(cls, raw: bytes) -> LockHolder | None:
        """None for an empty file (released, or its holder is still writing it)."""
        if not raw.strip():
            return None
        try:
            fields = json.loads(raw)
            return cls(int(fields["pid"]), str(fields["host"]), str(fields["started"]), str(fields["command"]))
        except (ValueError, KeyError, TypeError):
            return cls(0, "?", "", "an unreadable .lock file")

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    def describe(self) -> str:
        """'pid 4121 on host-a since 12:03 (stablediff train)'."""
        if not self.pid:
            return f"an unknown process ({self.command})"
        return f"pid {self.pid} on {self.host} since {_short_time(self.started)} ({self.command})"

    def gone_from_this_host(self) -> bool:
        """Its process no longer exists (only knowable for a holder on this host)."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False


def _short_time(iso: str) -> str:
    """HH:MM for today, the date as well for another day; local time."""
    try:
        when = dt.datetime.fromisoformat(iso).astimezone()
    except ValueError:
        return iso or "an unknown time"
    return when.strftime("%H:%M" if when.date() == dt.date.today() else "%Y-%m-%d %H:%M")


class RunDirInUse(UserError, RuntimeError):
    """Another live process holds the run directory's lock."""

    def __init__(self, run_dir: Path, holder: LockHolder | None, hint: str):
        who = holder.describe() if holder else "another process (it has not written who it is yet)"
        note = ""
        if holder is not None and holder.gone_from_this_host():
            note = " (that process has exited, but a process it started still holds the lock)"
        super().__init__(f"run dir {run_dir} is in use by {who}{note}; {hint}")
        self.run_dir, self.holder = run_dir, holder


class RunLock:
    """`acquire` takes the lock of `run_dir` (creating the directory), `release` gives it back."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, command: str, hint: str = "wait for it or pass another --run-dir") -> LockHolder | None:
        """Take the lock at once or raise RunDirInUse; returns the holder of a stale lock taken over."""
        assert self._fd is None, "this RunLock is already held"
        fd = self._open()
        try:
            self._flock_or_refuse(fd, hint)
            stale = LockHolder.parse(os.pread(fd, _MAX_LOCK_BYTES, 0))
            _rewrite(fd, LockHolder.current(command).to_bytes())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _held_fds.add(fd)
        return stale

    def release(self) -> None:
        """Empty the file (a clean end, so the next holder does not warn), then unlock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _held_fds.discard(fd)
        try:
            _rewrite(fd, b"")
        finally:
            os.close(fd)  # drops the flock

    def _open(self) -> int:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise NotAFolderError(f"{self.run_dir} is a file, not a directory: a run directory is a folder. "
                                  "Remove the file or pass another --run-dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _flock_or_refuse(self, fd: int, hint: str) -> None:
        deadline = time.monotonic() + HOLDER_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                holder = LockHolder.parse(os.pread(fd, _MAX_LOCK_BYTES, 0))
                if holder is not None or time.monotonic() >= deadline:
                    raise RunDirInUse(self.run_dir, holder, hint) from None
                time.sleep(0.05)


def _rewrite(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    if data:
        os.pwrite(fd, data, 0)
    os.fsync(fd)


def has_run_content(run_dir: Path) -> bool:
    """Anything in `run_dir` besides what a starting command writes before any work: its
    lock and its primary store's owner record (so `--fresh` still sees an unused folder)."""
    from .ownership import OWNER_FILE

    for entry in run_dir.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.name == "checkpoints" and entry.is_dir() and {p.name for p in entry.iterdir()} <= {OWNER_FILE}:
            continue
        return True
    return False
