"""Two-phase asynchronous checkpointing for the training loop.

Phase one, in the training thread at a step boundary: copy every tensor into
host buffers that are allocated once and reused, so memory does not grow from
save to save. Phase two, in one background thread: hash, deduplicate, write
and commit to the primary store, then bring each replica up to date, then
apply retention. At most one save is in flight; since the next snapshot reuses
the same buffers, it first waits for the previous save (and logs the wait).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ._codec import is_torch_tensor, tensor_bytes
from .errors import CheckpointError
from .manifest import plain_json, plain_metrics
from .replicate import sync
from .retention import RetentionPolicy
from .store import CheckpointStore, check_step

_logger = logging.getLogger("stablediff.checkpoint")


@dataclass
class SaveStats:
    """Timings of one save; the background fields are filled when it finishes."""

    step: int
    wait_s: float  # training thread blocked on the previous save
    snapshot_s: float  # training thread copying into host buffers
    primary_s: float | None = None  # background: hash + write + commit on the primary
    replicate_s: float | None = None
    retention_s: float | None = None
    write_s: float | None = None  # background total
    bytes_new: int | None = None
    chunks_checked: int | None = None  # reused chunks compared with memory (first reuse in this process)
    chunks_healed: int | None = None  # present but damaged: rewritten from memory
    replicas_behind: list[str] = field(default_factory=list)


class AsyncCheckpointer:
    """The training loop's checkpoint writer: `snapshot_and_save` at a step boundary,
    `close` (or leave the `with` block) at the end of the run.

    Replicas are best effort: a failing one is logged, listed in `behind`, and
    caught up by the next save; only a failing primary raises.
    """

    def __init__(
        self,
        primary: CheckpointStore,
        replicas: Iterable[CheckpointStore] = (),
        retention: RetentionPolicy | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.primary = primary
        self.replicas = list(replicas)
        self.retention = retention
        self._log = log or _logger.warning
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
        self._pending: tuple[int, Future] | None = None
        self._buffers: dict[str, Any] = {}
        self.behind: dict[str, str] = {}  # replica location -> why it is behind
        self.stats: list[SaveStats] = []
        self._closed = False

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # do not let a save error hide the exception that is already propagating
            self.close()
        except CheckpointError as save_error:
            self._log(f"checkpoint: {save_error}")

    def host_buffer(self, name: str) -> Any:
        """The reusable host buffer that holds tensor `name` (for tests and benchmarks)."""
        return self._buffers[name]

    def snapshot_and_save(
        self,
        step: int,
        tensors: Mapping[str, Any],
        meta: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> SaveStats:
        """Snapshot now, write in the background; returns as soon as the copy is done.

        Raises the previous save's background error, if any, before doing anything.
        """
        if self._closed:
            raise CheckpointError("this AsyncCheckpointer is closed; create a new one to save again")
        wait_s = self._wait_previous(log_wait=True)
        step = check_step(step)
        meta = plain_json(dict(meta or {}), "meta")  # fail here, not in the background
        metrics = plain_metrics(metrics)
        started = time.perf_counter()
        snapshot = self._snapshot(tensors)
        stats = SaveStats(step, wait_s, time.perf_counter() - started)
        self.stats.append(stats)
        future = self._executor.submit(self._write, step, snapshot, meta, metrics, stats)
        self._pending = (step, future)
        return stats

    def busy(self) -> bool:
        """Whether a save is still being written (without waiting for it or raising its error)."""
        return self._pending is not None and not self._pending[1].done()

    def wait(self) -> None:
        """Block until the save in flight is committed; re-raise its error, if any."""
        self._wait_previous(log_wait=False)

    def close(self) -> None:
        """Finish the save in flight and stop the writer thread; re-raises its error."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)
            self._closed = True

    # -- training thread --------------------------------------------------

    def _wait_previous(self, log_wait: bool) -> float:
        if self._pending is None:
            return 0.0
        step, future = self._pending
        was_running = not future.done()
        started = time.perf_counter()
        try:
            future.result()
        except Exception as exc:
            raise CheckpointError(
                f"saving the checkpoint of step {step} to {self.primary.location} failed in the "
                f"background: {exc!r}. Earlier checkpoints are intact; fix the cause (disk space, "
                f"permissions, mount) and resume from the newest checkpoint."
            ) from exc
        finally:
            self._pending = None
        waited = time.perf_counter() - started
        if was_running and log_wait:
            self._log(
                f"checkpoint: waited {waited:.2f} s for the save of step {step} to finish "
                f"(saving takes longer than the save interval)"
            )
        return waited

    def _snapshot(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        for stale in set(self._buffers) - set(tensors):
            del self._buffers[stale]  # a tensor that went away must not pin its buffer
        on_gpu = False
        for name, value in tensors.items():
            if is_torch_tensor(value):
                on_gpu |= value.device.type == "cuda"
                self._copy_torch(name, value)
            elif isinstance(value, np.ndarray):
                self._copy_numpy(name, value)
            else:
                tensor_bytes(name, value)  # raises the user-facing type error
        if on_gpu:
            import torch

            torch.cuda.synchronize()  # the non-blocking copies must land before the writer reads
        return {name: self._buffers[name] for name in tensors}

    def _copy_torch(self, name: str, value: Any) -> None:
        import torch

        buffer = self._buffers.get(name)
        if not (is_torch_tensor(buffer) and buffer.shape == value.shape and buffer.dtype == value.dtype):
            pinned = value.device.type == "cuda"  # pinned memory makes device->host copies async
            buffer = torch.empty(value.shape, dtype=value.dtype, pin_memory=pinned)
            self._buffers[name] = buffer
        buffer.copy_(value.detach(), non_blocking=value.device.type == "cuda")

    def _copy_numpy(self, name: str, value: np.ndarray) -> None:
        buffer = self._buffers.get(name)
        if not (isinstance(buffer, np.ndarray) and buffer.shape == value.shape and buffer.dtype == value.dtype):
            buffer = np.empty(value.shape, dtype=value.dtype)
            self._buffers[name] = buffer
        np.copyto(buffer, value)

    # -- writer thread ----------------------------------------------------

    def _write(self, step: int, snapshot: dict[str, Any], meta: dict, metrics: dict, stats: SaveStats) -> None:
        started = time.perf_counter()
        manifest = self.primary.save(step, snapshot, meta, metrics)
        stats.bytes_new = manifest.bytes_new
        self._note_chunks(stats)
        stats.primary_s = time.perf_counter() - started
        mark = time.perf_counter()
        for replica in self.replicas:
            self._replicate(replica)
        stats.replicate_s = time.perf_counter() - mark
        mark = time.perf_counter()
        if self.retention is not None:
            self._apply_retention(self.primary)
            for replica in self.replicas:
                if replica.location not in self.behind:
                    self._guard_replica(replica, "retention", lambda r=replica: self._apply_retention(r))
        stats.retention_s = time.perf_counter() - mark
        stats.write_s = time.perf_counter() - started
        stats.replicas_behind = sorted(self.behind)

    def _note_chunks(self, stats: SaveStats) -> None:
        counts = self.primary.last_save
        if counts is None:
            return
        stats.chunks_checked, stats.chunks_healed = counts.checked, len(counts.healed)
        if counts.healed:
            shown = ", ".join(f"{h[:12]}…" for h in counts.healed[:5])
            self._log(
                f"checkpoint: healed {len(counts.healed)} damaged chunk(s) in {self.primary.location} "
                f"({shown}): their bytes on disk did not match, so they were rewritten from memory; "
                f"older checkpoints that share them are whole again"
            )

    def _apply_retention(self, store: CheckpointStore) -> None:
        assert self.retention is not None
        report = self.retention.apply(store)
        if report.held_reason:
            self._log(f"checkpoint: {report.held_reason}")

    def _replicate(self, replica: CheckpointStore) -> None:
        # sync copies whatever the replica misses, so one that was behind catches up here.
        report = self._guard_replica(replica, "sync", lambda: sync(self.primary, replica))
        if report is None:
            return
        for problem in report.problems:
            self._log(f"checkpoint: replica {replica.location}: {problem}")
        if replica.location in self.behind:
            del self.behind[replica.location]
            self._log(f"checkpoint: replica {replica.location} has caught up")

    def _guard_replica(self, replica: CheckpointStore, what: str, action: Callable[[], Any]) -> Any:
        """Run `action`; a replica failure of any kind is logged and remembered, never raised."""
        try:
            return action()
        except Exception as exc:
            self.behind[replica.location] = f"{what} failed: {exc!r}"
            self._log(
                f"checkpoint: replica {replica.location} is behind ({what} failed: {exc!r}); "
                f"training continues and the replica is retried at the next save"
            )
            return None
