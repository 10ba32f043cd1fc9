"""The feature cache's storage: keys -> rows of named tensors in verified safetensors shards.

`index.json` maps each key to `[shard, row]` and records each shard's size and
BLAKE3. It is the commit point, as in the checkpoint store: a shard is written
to a temporary name, fsynced and renamed, and only then is the index rewritten
the same way. A crash leaves an index that names only complete shards. Shards
are verified against the index when first read; a damaged one is reported,
dropped, and its keys come back from `_missing()` to be encoded again. One
process writes a directory at a time (an exclusive `flock` on `.lock`).
What the rows hold (posteriors, embeddings) is data/feature_cache.py's business.
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import blake3
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from stablediff.errors import DataError
from stablediff.io.atomic import is_temp, replace_atomic

try:  # POSIX; elsewhere writers are not serialised (one writer per namespace, as documented)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

FORMAT = 1
INDEX = "index.json"
LOCK = ".lock"
DEFAULT_SHARD_SIZE = 1024
DEFAULT_MAX_CACHED_BYTES = 1 << 30  # decoded shards kept in memory per store


class FeatureCacheError(DataError):
    """The cache cannot answer a request; the message says what to do."""


class FeatureCacheWarning(UserWarning):
    """Something in the cache was damaged or unreadable and will be encoded again."""


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}.safetensors"



@contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(directory / LOCK, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ShardedStore:
    """Keys -> rows of named tensors in verified safetensors shards, behind an atomic index."""

    def __init__(self, directory: Path, identity: dict[str, str], shard_size: int, max_cached_bytes: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        self.directory = directory
        self.identity = identity
        self.shard_size = shard_size
        self.max_cached_bytes = max_cached_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._shards, self._entries = self._read_index()  # id -> record; key -> (shard id, row)
        self._pending_keys: list[str] = []
        self._pending: dict[str, list[torch.Tensor]] = {}  # tensor name -> row chunks not yet written
        self._pending_names: dict[str, frozenset[str]] = {}  # pending key -> its tensor names
        self._decoded: OrderedDict[tuple[int, str], dict[str, torch.Tensor]] = OrderedDict()
        self._decoded_bytes = 0
        self._verified: set[tuple[int, str]] = set()

    def __len__(self) -> int:
        return len(self._entries.keys() | self._pending_names.keys())

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.flush()
            return
        try:  # keep what was encoded before the error: the next run resumes from it
            self.flush()
        except Exception as flush_error:  # noqa: BLE001 - the original error is the one to report
            warnings.warn(f"feature cache {self.directory}: could not save buffered rows ({flush_error})",
                          FeatureCacheWarning, stacklevel=2)

    # -- index -------------------------------------------------------------------------------

    def _read_index(self) -> tuple[dict[int, dict], dict[str, tuple[int, int]]]:
        path = self.directory / INDEX
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}, {}
        except (OSError, ValueError) as exc:
            return self._unreadable_index(path, exc)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            found = document.get("format") if isinstance(document, dict) else None
            raise FeatureCacheError(f"{path}: feature cache format {found!r}, this stablediff reads {FORMAT}; "
                                    f"delete {self.directory} to rebuild it")
        if document.get("identity") != self.identity:
            raise FeatureCacheError(f"{path} belongs to {document.get('identity')}, not {self.identity} "
                                    f"(a hash collision or a moved folder); delete {self.directory} to rebuild it")
        try:
            shards = {int(shard_id): dict(record) for shard_id, record in document["shards"].items()}
            entries = {key: (int(shard_id), int(row)) for key, (shard_id, row) in document["entries"].items()}
            entries = {key: location for key, location in entries.items() if location[0] in shards}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return self._unreadable_index(path, exc)
        return shards, entries

    def _unreadable_index(self, path: Path, exc: Exception) -> tuple[dict, dict]:
        warnings.warn(f"feature cache index {path} is unreadable ({type(exc).__name__}: {exc}); "
                      "starting from an empty index, so this namespace is encoded again",
                      FeatureCacheWarning, stacklevel=4)
        return {}, {}

    def _write_index(self) -> None:
        document = {"format": FORMAT, "identity": self.identity,
                    "shards": {str(shard_id): record for shard_id, record in sorted(self._shards.items())},
                    "entries": {key: list(location) for key, location in self._entries.items()}}
        replace_atomic(self.directory / INDEX, json.dumps(document, separators=(",", ":")).encode())

    def _remove_temps(self) -> None:
        """Temps are written only under the lock, so any found while holding it are a crash's leftovers."""
        for path in self.directory.iterdir():
            if is_temp(path.name):  # `<final name>.tmp-<pid>-<random>`: never read
                path.unlink(missing_ok=True)

    # -- writing ---------------------------------------------------------------------------------

    def _append(self, keys: list[str], tensors: dict[str, torch.Tensor]) -> None:
        """Buffer rows; full shards are written as they fill. A shard holds one set of tensor names."""
        if self._pending and set(self._pending) != set(tensors):
            self.flush()
        names = frozenset(tensors)
        for name, tensor in tensors.items():
            if len(tensor) != len(keys):
                raise ValueError(f"{len(keys)} keys but {len(tensor)} rows of {name!r}")
            self._pending.setdefault(name, []).append(tensor.detach().to("cpu", torch.float32).contiguous())
        self._pending_keys.extend(keys)
        self._pending_names.update(dict.fromkeys(keys, names))
        while len(self._pending_keys) >= self.shard_size:
            self._write_shard(self.shard_size)

    def flush(self) -> None:
        """Write every buffered row to disk (a last, possibly short, shard) and commit the index."""
        while self._pending_keys:
            self._write_shard(min(len(self._pending_keys), self.shard_size))

    def _write_shard(self, num_rows: int) -> None:
        keys = self._pending_keys[:num_rows]
        merged = {name: torch.cat(chunks) for name, chunks in self._pending.items()}
        tensors = {name: rows[:num_rows].contiguous() for name, rows in merged.items()}
        data = save_safetensors(tensors, metadata={"format": str(FORMAT), **self.identity})
        with _exclusive(self.directory):
            # Another writer may have committed shards since we read the index: start from its state.
            self._shards, self._entries = self._read_index()
            self._remove_temps()
            shard_id = max(self._shards, default=-1) + 1  # an orphan from a crash is simply replaced
            replace_atomic(self.directory / shard_name(shard_id), data)
            record = {"rows": num_rows, "bytes": len(data), "blake3": blake3.blake3(data).hexdigest(),
                      "tensors": sorted(tensors)}
            self._shards[shard_id] = record
            self._entries.update((key, (shard_id, row)) for row, key in enumerate(keys))
            self._write_index()
        self._remember((shard_id, record["blake3"]), tensors)
        self._verified.add((shard_id, record["blake3"]))
        self._pending_keys = self._pending_keys[num_rows:]
        self._pending = {name: [rows[num_rows:]] for name, rows in merged.items()} if self._pending_keys else {}
        for key in keys:
            self._pending_names.pop(key, None)

    # -- reading ---------------------------------------------------------------------------------

    def _missing(self, keys: Iterable[str], needed: frozenset[str]) -> list[str]:
        """Keys (unique, in order) not cached with all `needed` tensors; damaged shards are dropped first."""
        keys = list(dict.fromkeys(keys))
        for shard_id in sorted({self._entries[key][0] for key in keys if key in self._entries}):
            record = self._shards.get(shard_id)
            if record is not None and (shard_id, record["blake3"]) not in self._verified:
                self._load_shard(shard_id, raise_on_damage=False)
        return [key for key in keys if not self._has(key, needed)]

    def _has(self, key: str, needed: frozenset[str]) -> bool:
        if key in self._pending_names:
            return needed <= self._pending_names[key]
        location = self._entries.get(key)
        return location is not None and needed <= set(self._shards[location[0]]["tensors"])

    def _gather(self, keys: Sequence[str], needed: frozenset[str]) -> dict[str, torch.Tensor]:
        """Rows of the `needed` tensors for `keys`, stacked in the order given."""
        if not keys:
            raise ValueError("no keys given: pass at least one key to get()")
        self.flush()
        absent = [key for key in keys if key not in self._entries]
        if absent:
            raise FeatureCacheError(f"{len(absent)} of {len(keys)} requested entries are not in {self.directory} "
                                    f"(first: {absent[0]!r}); call missing() and add() for them first")
        by_shard: dict[int, tuple[list[int], list[int]]] = {}
        for position, key in enumerate(keys):
            shard_id, row = self._entries[key]
            positions, rows = by_shard.setdefault(shard_id, ([], []))
            positions.append(position)
            rows.append(row)
        out: dict[str, torch.Tensor] = {}
        for shard_id, (positions, rows) in by_shard.items():
            tensors = self._load_shard(shard_id, raise_on_damage=True)
            lacking = needed - tensors.keys()
            if lacking:
                raise FeatureCacheError(f"{self.directory / shard_name(shard_id)} has no {sorted(lacking)}: "
                                        "those samples were cached without them; add them again (flip=True)")
            rows_at, positions_at = torch.tensor(rows), torch.tensor(positions)
            for name in needed:
                source = tensors[name]
                if name not in out:
                    out[name] = source.new_empty((len(keys), *source.shape[1:]))
                out[name][positions_at] = source[rows_at]
        return out

    def _load_shard(self, shard_id: int, raise_on_damage: bool) -> dict[str, torch.Tensor] | None:
        record = self._shards[shard_id]
        tag = (shard_id, record["blake3"])
        if tag in self._decoded:
            self._decoded.move_to_end(tag)
            return self._decoded[tag]
        path = self.directory / shard_name(shard_id)
        tensors, problem = _read_verified(path, record)
        if problem is None:
            self._verified.add(tag)
            self._remember(tag, tensors)
            return tensors
        self._drop_damaged(shard_id, record, problem)
        if raise_on_damage:
            raise FeatureCacheError(f"{path} is damaged ({problem}) and was dropped from the index; call "
                                    "missing() and add() again to re-encode its samples")
        return None

    def _remember(self, tag: tuple[int, str], tensors: dict[str, torch.Tensor]) -> None:
        """Keep decoded shards in memory (least recently used out first) up to `max_cached_bytes`."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        self._decoded[tag] = tensors
        self._decoded_bytes += size
        while self._decoded_bytes > self.max_cached_bytes and len(self._decoded) > 1:
            _, evicted = self._decoded.popitem(last=False)
            self._decoded_bytes -= sum(t.numel() * t.element_size() for t in evicted.values())

    def _drop_damaged(self, shard_id: int, record: dict, problem: str) -> None:
        path = self.directory / shard_name(shard_id)
        warnings.warn(f"feature cache shard {path} is damaged ({problem}); its {record['rows']} entries "
                      "will be encoded again", FeatureCacheWarning, stacklevel=5)
        with _exclusive(self.directory):
            self._shards, self._entries = self._read_index()
            if self._shards.get(shard_id, {}).get("blake3") == record["blake3"]:  # not replaced meanwhile
                del self._shards[shard_id]
                self._entries = {key: loc for key, loc in self._entries.items() if loc[0] != shard_id}
                self._write_index()
                path.unlink(missing_ok=True)


def _read_verified(path: Path, record: dict) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """(tensors, None) if the shard matches its index record, else (None, what is wrong)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "the file is missing"
    except OSError as exc:
        return None, f"unreadable: {exc}"
    if len(data) != record["bytes"]:
        return None, f"{len(data)} bytes where the index recorded {record['bytes']}"
    if blake3.blake3(data).hexdigest() != record["blake3"]:
        return None, "its BLAKE3 does not match the index: the bytes changed on disk"
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        return None, f"not a readable safetensors file: {exc}"
    if sorted(tensors) != record["tensors"] or any(len(t) != record["rows"] for t in tensors.values()):
        return None, f"holds {sorted(tensors)} with other row counts than the index's {record['rows']}"
    return tensors, None

