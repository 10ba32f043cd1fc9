"""What the commands that write a run do first: take its lock, and check whose its stores are.

Both happen before any heavy import or work, so a refusal is instant and loses
nothing (checkpoint/lock.py, checkpoint/ownership.py).
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import click

from stablediff.checkpoint import CheckpointStore
from stablediff.checkpoint.lock import RunDirInUse, RunLock
from stablediff.checkpoint.ownership import StoreOwnedByAnotherRun, claim, read_owner, run_owner
from stablediff.errors import UserError

RUN_DIR_HINT = "wait for it or pass another --run-dir"
CKPT_HINT = "wait for it to finish (or stop it), then run this command again"


def writes_the_run() -> bool:
    """Under torchrun rank 0 alone writes the run directory (training/distributed.py), so it alone
    holds the lock and the store claims for the whole job. RANK is read here directly: importing
    torch first would make a refusal slow."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def run_dir_locked(run_dir: Path, command: str, hint: str = RUN_DIR_HINT) -> Iterator[None]:
    """Hold RUN_DIR/.lock for the block; a second process exits 1 at once, naming the holder."""
    if not writes_the_run():
        yield
        return
    lock = RunLock(run_dir)
    try:
        stale = lock.acquire(command, hint)
    except RunDirInUse as exc:
        raise UserError(str(exc)) from None
    if stale is not None:
        click.echo(f"warning: took over the stale lock of {run_dir}: its holder, {stale.describe()}, "
                   "is no longer running", err=True)
    try:
        yield
    finally:
        lock.release()


def claim_run_stores(run_dir: Path, replicas: Iterable[str]) -> None:
    """This run's identity from its primary store (created, or adopted from an older version), and
    each replica claimed for it; a replica another run owns is refused with exit 1."""
    if not writes_the_run():
        return
    owner = run_owner(CheckpointStore(run_dir / "checkpoints"), run_dir)
    for location in replicas:
        try:
            claim(CheckpointStore(location), owner)
        except StoreOwnedByAnotherRun as exc:
            raise UserError(str(exc)) from None
        except OSError as exc:  # an unreachable replica never stops a run; every sync checks it again
            click.echo(f"warning: replica {location} could not be checked ({exc}); the run goes on and "
                       "each save checks it again", err=True)


def lock_dir_of_store(target: str) -> Path | None:
    """The directory whose lock `ckpt gc`/`repair` hold to write TARGET: the run directory it is
    (or whose checkpoints/ it is), the local run that owns it as a replica, or the store itself."""
    path = Path(target)
    local = "://" not in target
    if local and looks_like_run_dir(path):
        return path
    if local and path.name == "checkpoints" and looks_like_run_dir(path.parent):
        return path.parent
    try:
        owner = read_owner(CheckpointStore(target))
    except (OSError, ValueError):
        owner = None
    if owner is not None and owner.host == socket.gethostname() and Path(owner.run_dir).is_dir():
        return Path(owner.run_dir)
    return path if local and (path / "manifests").is_dir() else None


def looks_like_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "checkpoints").is_dir() or (path / ".lock").is_file()


@contextmanager
def store_locked(target: str, command: str) -> Iterator[None]:
    """`ckpt repair`/`gc` hold the lock of whatever writes TARGET, so they never run beside a trainer."""
    lock_dir = lock_dir_of_store(target)
    if lock_dir is None:  # a remote store no local run owns: nothing to lock
        yield
        return
    with run_dir_locked(lock_dir, command, CKPT_HINT):
        yield
