"""A content-addressed checkpoint store on a local directory or any fsspec URL.

Layout:
    objects/<first 2 hex>/<blake3 hex>   immutable chunks of tensor bytes
    manifests/<step:012d>.json           one manifest per checkpoint (the commit point)

A save writes every new chunk durably (temp name, fsync, rename, directory
fsync) and only then the manifest, the same way. A crash at any instant
therefore leaves either the complete new checkpoint or none of it, and the
older ones untouched. A chunk that already exists is not written again, so
tensors that did not change since any earlier checkpoint cost no bytes; the
first time a process reuses one it checks the bytes and heals a damaged copy
(see `dedup`).
"""

from __future__ import annotations

import operator
import os
import re
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import blake3
import fsspec

from stablediff.io.atomic import is_temp

from ._codec import tensor_bytes
from ._fs import open_store_fs
from .dedup import ChunkCounts, ChunkPlacer
from .errors import CheckpointError, ChunkError, ManifestError
from .manifest import Manifest, ManifestSummary, TensorEntry, build_manifest, parse_manifest

if TYPE_CHECKING:
    from .verified_load import LoadedCheckpoint
    from .verify import VerifyReport

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024

_MANIFEST_NAME = re.compile(r"^(\d{12,})\.json$")
_OBJECT_NAME = re.compile(r"^[0-9a-f]{64}$")


def chunk_hash(data: memoryview | bytes) -> str:
    return blake3.blake3(data).hexdigest()


def check_step(step: Any) -> int:
    if isinstance(step, bool) or not hasattr(step, "__index__") or operator.index(step) < 0:
        raise CheckpointError(f"checkpoint step must be a non-negative integer, got {step!r}")
    return operator.index(step)


class CheckpointStore:
    """One store: `save`, `load`, `list`, `verify`; plus the chunk/manifest primitives
    that retention, replication and repair are built from.

    An instance remembers which chunks it knows are good (`known_good`: written,
    compared or read and verified by it), so use one instance per location in a
    process. `check_reused=False` trusts a present chunk's size, as stablediff did
    before it healed chunks; it exists for the benchmark's baseline only.
    """

    def __init__(
        self,
        location: str | os.PathLike,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        fs: fsspec.AbstractFileSystem | None = None,
        check_reused: bool = True,
    ):
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        # No I/O here: a replica on a missing mount must not fail construction.
        self._fs = open_store_fs(location, fs)
        self.location = self._fs.location
        self.check_reused = check_reused
        self.known_good: set[str] = set()
        self.last_save: ChunkCounts | None = None  # what the newest `save` did with its chunks

    def __repr__(self) -> str:
        return f"CheckpointStore({self.location!r})"

    # -- paths -------------------------------------------------------------

    @staticmethod
    def object_rel(hash_hex: str) -> str:
        return f"objects/{hash_hex[:2]}/{hash_hex}"

    @staticmethod
    def manifest_rel(step: int) -> str:
        return f"manifests/{step:012d}.json"

    # -- manifests -----------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps of every committed manifest (valid or not), oldest first."""
        found = (_MANIFEST_NAME.match(name) for name in self._fs.list_files("manifests"))
        return sorted(int(m.group(1)) for m in found if m)

    def read_manifest_bytes(self, step: int) -> bytes:
        try:
            return self._fs.read(self.manifest_rel(step))
        except FileNotFoundError:
            raise CheckpointError(self._unknown_step_message(step)) from None

    def read_manifest(self, step: int) -> Manifest:
        """The verified manifest of `step`; ManifestError if it is corrupt."""
        where = f"{self.location}/{self.manifest_rel(step)}"
        manifest = parse_manifest(self.read_manifest_bytes(step), where)
        if manifest.step != step:
            raise ManifestError(f"manifest {where} claims step {manifest.step} (file was renamed?)")
        return manifest

    def write_manifest(self, manifest: Manifest | bytes, step: int | None = None) -> None:
        """Commit a checkpoint. Call only after every chunk it names is durable."""
        if isinstance(manifest, Manifest):
            step, manifest = manifest.step, manifest.to_bytes()
        assert step is not None, "step is required with raw manifest bytes"
        self._fs.write_atomic(self.manifest_rel(step), manifest)

    def delete_manifest(self, step: int) -> None:
        self._fs.remove(self.manifest_rel(step))
        self._fs.sync_dirs({"manifests"})

    def _unknown_step_message(self, step: int) -> str:
        steps = self.steps()
        shown = ", ".join(map(str, steps[-10:])) if steps else "none"
        return (
            f"no checkpoint for step {step} in {self.location}; available steps: {shown}. "
            f"Run `stablediff ckpt list` to see them, or omit the step to load the newest."
        )

    # -- chunks ---------------------------------------------------------------

    def scan_objects(self) -> tuple[dict[str, tuple[int, float]], list[tuple[str, float]]]:
        """({hash: (size, mtime)} of committed chunks, [(rel path, mtime)] of temp files)."""
        objects: dict[str, tuple[int, float]] = {}
        temps: list[tuple[str, float]] = []
        for top in ("objects", "manifests", "abandoned"):  # abandoned/: rollback records (lineage.py)
            for rel, size, mtime in self._fs.walk_files(top):
                name = rel.rsplit("/", 1)[-1]
                if is_temp(name):
                    temps.append((rel, mtime))
                elif top == "objects" and _OBJECT_NAME.match(name):
                    objects[name] = (size, mtime)
        return objects, temps

    def object_sizes(self) -> dict[str, int]:
        return {h: size for h, (size, _mtime) in self.scan_objects()[0].items()}

    def chunk_size(self, hash_hex: str) -> int | None:
        return self._fs.size(self.object_rel(hash_hex))

    def read_chunk_into(self, hash_hex: str, out: memoryview) -> None:
        """Fill `out` with the chunk and check it against its name; ChunkError if bad."""
        self.known_good.discard(hash_hex)
        try:
            actual = self._fs.read_into(self.object_rel(hash_hex), out)
        except FileNotFoundError:
            raise ChunkError(hash_hex, "missing") from None
        if actual != len(out):
            raise ChunkError(hash_hex, f"truncated or the wrong size ({actual} bytes, expected {len(out)})")
        if chunk_hash(out) != hash_hex:
            raise ChunkError(hash_hex, "corrupt (its bytes do not match its hash)")
        self.known_good.add(hash_hex)

    def read_chunk(self, hash_hex: str, size: int) -> bytearray:
        out = bytearray(size)
        self.read_chunk_into(hash_hex, memoryview(out))
        return out

    def put_chunk(self, hash_hex: str, data: memoryview | bytes, *, sync_dir: bool = True) -> None:
        """Write one chunk durably under its hash (replacing a damaged copy if present)."""
        self._fs.write_atomic(self.object_rel(hash_hex), data, sync_dir=sync_dir)
        self.known_good.add(hash_hex)

    def same_bytes_on_disk(self, hash_hex: str, data: memoryview, scratch: bytearray | None = None) -> bool:
        """Whether the stored chunk holds exactly `data` (whose hash is `hash_hex`); `scratch`,
        when it has data's length, is reused to read into."""
        on_disk = scratch if scratch is not None and len(scratch) == len(data) else bytearray(len(data))
        try:
            actual = self._fs.read_into(self.object_rel(hash_hex), memoryview(on_disk))
        except FileNotFoundError:
            return False
        return actual == len(data) and on_disk == data  # bytearray == buffer is a memcmp

    def touch_chunk(self, hash_hex: str) -> bool:
        """Mark a chunk as referenced now (gc's grace); False if it is gone."""
        return self._fs.touch(self.object_rel(hash_hex))

    def remove_chunk(self, hash_hex: str) -> None:
        self.known_good.discard(hash_hex)
        self._fs.remove(self.object_rel(hash_hex))

    def sync_object_dirs(self, hashes: Iterable[str]) -> None:
        """Make chunk renames durable, one directory fsync per fan-out directory."""
        self._fs.sync_dirs({f"objects/{h[:2]}" for h in hashes})

    def remove_file(self, rel: str) -> None:
        self._fs.remove(rel)

    # -- save / load / verify --------------------------------------------------

    def save(
        self,
        step: int,
        tensors: Mapping[str, Any],
        meta: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> Manifest:
        """Write a checkpoint and commit it; returns its manifest.

        `tensors` maps names to numpy arrays or torch tensors (any device);
        `meta` is plain JSON; `metrics` are numbers such as val_loss.
        Saving a step that already exists replaces that checkpoint.
        """
        step = check_step(step)
        placer = ChunkPlacer(self, self.scan_objects()[0])  # one listing instead of one stat per chunk
        entries: dict[str, TensorEntry] = {}
        for name, value in tensors.items():
            if not isinstance(name, str) or not name:
                raise CheckpointError(f"tensor names must be non-empty strings, got {name!r}")
            dtype, shape, data = tensor_bytes(name, value)
            hashes = []
            for start in range(0, len(data), self.chunk_bytes):
                piece = data[start : start + self.chunk_bytes]
                hashes.append(chunk_hash(piece))
                placer.place(hashes[-1], piece)
            entries[name] = TensorEntry(dtype, shape, len(data), tuple(hashes))
        placer.finish()
        self.last_save = placer.counts
        manifest = build_manifest(step, self.chunk_bytes, entries, meta, metrics, placer.counts.bytes_new)
        self.write_manifest(manifest)
        return manifest

    def load(
        self, step: int | None = None, device: str = "cpu", fallbacks: Iterable[CheckpointStore] = ()
    ) -> LoadedCheckpoint:
        """Load `step`, or the newest checkpoint that verifies; see `loading.load_checkpoint`."""
        from .verified_load import load_checkpoint

        return load_checkpoint(self, step, device, list(fallbacks))

    def verify(self, deep: bool = False) -> VerifyReport:
        """Check manifests and chunks; see `verify.verify_store`."""
        from .verify import verify_store

        return verify_store(self, deep)

    # Last in the class body: a method named `list` would shadow the builtin in
    # annotations of any method defined after it.
    def list(self, include_abandoned: bool = False) -> list[ManifestSummary]:
        """One summary per manifest, oldest first; corrupt ones have valid=False. Checkpoints
        abandoned by a divergence rollback (lineage.py) are left out unless `include_abandoned`."""
        from .lineage import abandoned_index, abandoned_summaries

        abandoned, summaries, not_moved = abandoned_index([self]), [], []
        for step in self.steps():
            try:
                manifest = self.read_manifest(step)
            except ManifestError as exc:
                summaries.append(ManifestSummary(step, None, 0, 0, {}, valid=False, problem=str(exc)))
                continue
            except CheckpointError:  # deleted between listing and reading
                continue
            if manifest.checksum in abandoned.get(step, ()):
                not_moved.append(manifest)  # a crash right after the rollback left it in manifests/
            else:
                summaries.append(ManifestSummary.of(manifest))
        if include_abandoned:
            summaries += abandoned_summaries(self, not_moved)
            summaries.sort(key=lambda s: (s.step, s.abandoned_by is None, s.time or 0.0))
        return summaries
