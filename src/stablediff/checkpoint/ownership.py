"""Store ownership: which run a checkpoint store belongs to.

A store records the run that writes it in its root, `owner.json` =
{run_id, run_dir, host, created}, written once and never replaced. A run's
identity is the owner record of its primary store (`RUN_DIR/checkpoints`),
created when the run first starts; the primary of a run directory written by
an older version, which has no owner file, is adopted silently.

Replicas carry their run's record too. Two runs configured with the same
replica location would otherwise share it, and each one's retention would
delete the other's checkpoints; so a replica owned by another run is refused
(at start, and again by every `sync` into it), and an unowned one is claimed
by the first run that writes it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from stablediff.io.atomic import temp_name

from ._fs import LocalFS
from .errors import CheckpointError

if TYPE_CHECKING:
    from .store import CheckpointStore

OWNER_FILE = "owner.json"


@dataclass(frozen=True)
class StoreOwner:
    run_id: str
    run_dir: str  # absolute, as the owner saw it
    host: str
    created: str  # ISO 8601

    @classmethod
    def new(cls, run_dir: str | os.PathLike) -> StoreOwner:
        created = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        return cls(uuid.uuid4().hex, os.path.abspath(run_dir), socket.gethostname(), created)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode() + b"\n"

    def describe(self) -> str:
        return f"run {self.run_id[:12]} (run dir {self.run_dir} on {self.host}, since {self.created})"


class StoreOwnedByAnotherRun(CheckpointError):
    """The store belongs to a different run than the one that wants to write it."""

    def __init__(self, location: str, owner: StoreOwner, writer: StoreOwner | None):
        this = f"this run ({writer.run_dir})" if writer else "this run directory (written by an older version)"
        super().__init__(
            f"replica {location} belongs to another run: {owner.describe()}, not to {this}. Two runs writing "
            f"one store delete each other's checkpoints, so it is not shared. Give this run its own replica "
            f"location in checkpoint.replicas, or, if that run's checkpoints there are no longer wanted, "
            f"remove {location}/{OWNER_FILE}")
        self.location, self.owner = location, owner


def read_owner(store: CheckpointStore) -> StoreOwner | None:
    """The store's owner record; None when it has none (new, or written by an older version)."""
    try:
        raw = store._fs.read(OWNER_FILE)
    except FileNotFoundError:
        return None
    try:
        fields = json.loads(raw)
        return StoreOwner(*(str(fields[k]) for k in ("run_id", "run_dir", "host", "created")))
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{store.location}/{OWNER_FILE} is unreadable ({exc!r}); if this store is "
                              f"your run's, remove that file and the next run claims the store again") from None


def claim(store: CheckpointStore, owner: StoreOwner) -> None:
    """Record `owner` in a store that has no owner; StoreOwnedByAnotherRun if another run has it."""
    current = read_owner(store)
    if current is None:
        _create_once(store, owner.to_bytes())
        current = read_owner(store)  # another run may have claimed it at the same instant
    if current is None or current.run_id != owner.run_id:
        raise StoreOwnedByAnotherRun(store.location, current or owner, owner)


def run_owner(primary: CheckpointStore, run_dir: str | os.PathLike) -> StoreOwner:
    """This run's identity: its primary store's owner, created (or adopted) at its first start."""
    owner = read_owner(primary)
    if owner is None:
        _create_once(primary, StoreOwner.new(run_dir).to_bytes())
        owner = read_owner(primary)
    assert owner is not None, f"{primary.location}/{OWNER_FILE} vanished as it was written"
    return owner


def check_sync_target(source: CheckpointStore, target: CheckpointStore) -> None:
    """Before copying `source` into `target`: refuse a target another run owns, claim an unowned one."""
    writer, owner = read_owner(source), read_owner(target)
    if owner is None:
        if writer is not None:
            claim(target, writer)
        return
    if writer is None or writer.run_id != owner.run_id:
        raise StoreOwnedByAnotherRun(target.location, owner, writer)


def _create_once(store: CheckpointStore, data: bytes) -> None:
    """Write the owner file only if there is none. On a local disk a hard link of a complete,
    fsynced file is atomic and refuses to replace one; an fsspec store has no such primitive,
    so there the re-read in `claim` has to catch a simultaneous claim."""
    fs = store._fs
    if not isinstance(fs, LocalFS):
        fs.write_atomic(OWNER_FILE, data)
        return
    claim_rel = temp_name(OWNER_FILE)
    fs.write_atomic(claim_rel, data)  # creates the store root durably if it is new
    try:
        os.link(os.path.join(fs.root, claim_rel), os.path.join(fs.root, OWNER_FILE))
    except FileExistsError:
        pass
    finally:
        fs.remove(claim_rel)
    fs.sync_dirs({""})
