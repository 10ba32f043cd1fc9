"""The on-disk feature cache: VAE posteriors and caption embeddings, encoded once, reused by every run.

Layout under the cache root (two namespaces, each invalidated only by its own encoder):

    latents/<vae fingerprint>/transform-<hash of transform_id>/   index.json, shard-00000.safetensors, ...
    text/<text encoder fingerprint>/                               index.json, shard-00000.safetensors, ...

A latents shard holds, per sample, the posterior `mean` and `std` (float32,
(C, h, w), unscaled: `scaling_factor` is applied by the trainer) and, for
samples added with `flip=True`, `flip_mean`/`flip_std` of the horizontally
mirrored image, so flip augmentation still works from the cache. A text shard
holds `embedding` (L, D) per distinct caption, keyed by the caption's BLAKE3.

`index.json` maps each key to `[shard, row]` and records each shard's size and
BLAKE3. It is the commit point, as in the checkpoint store: a shard is written
to a temporary name, fsynced and renamed, and only then is the index rewritten
the same way. A crash leaves an index that names only complete shards, so a
second run encodes just what the index lacks. Shards are verified against the
index when first read; a damaged one is reported, dropped, and its samples come
back from `missing()` to be encoded again.

One process writes a namespace at a time (an exclusive `flock` on
`.lock` serialises writers, e.g. ranks encoding in parallel); readers need no lock.
The index is rewritten per shard, which is fine to ~10^5-10^6 keys per namespace.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import blake3
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from stablediff.io.atomic import is_temp, replace_atomic
from stablediff.errors import DataError

try:  # POSIX; elsewhere writers are not serialised (one writer per namespace, as documented)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

FORMAT = 1
INDEX = "index.json"
LOCK = ".lock"
DEFAULT_SHARD_SIZE = 1024
DEFAULT_MAX_CACHED_BYTES = 1 << 30  # decoded shards kept in memory per store
LATENT_TENSORS = frozenset({"mean", "std"})
FLIP_TENSORS = frozenset({"flip_mean", "flip_std"})
TEXT_TENSORS = frozenset({"embedding"})
# The cache holds unscaled posteriors, so the scaling a trained VAE is given afterwards
# (and diffusers' bookkeeping keys, `_name_or_path` etc.) must not change the fingerprint.
FINGERPRINT_IGNORED_CONFIG = frozenset({"scaling_factor", "shift_factor"})
_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")


class FeatureCacheError(DataError):
    """The cache cannot answer a request; the message says what to do."""


class FeatureCacheWarning(UserWarning):
    """Something in the cache was damaged or unreadable and will be encoded again."""


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """BLAKE3 of the VAE's config and weights (tensors in name order): names its latents namespace."""
    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    config = {key: value for key, value in dict(vae.config).items()
              if not key.startswith("_") and key not in FINGERPRINT_IGNORED_CONFIG}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"\n{name}:{flat.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()[:32]


def caption_key(caption: str) -> str:
    """BLAKE3 of the caption's UTF-8 bytes: its key in the text namespace."""
    return blake3.blake3(caption.encode("utf-8", "surrogatepass")).hexdigest()


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}.safetensors"


def _path_component(text: str) -> str:
    """`text` itself when it is a tame directory name, else a hash of it."""
    return text if _SAFE_COMPONENT.fullmatch(text) else "h-" + blake3.blake3(text.encode()).hexdigest()[:24]


def _atomic_write(path: Path, data: bytes) -> None:
    """The checkpoint store's commit: temp name, fsync, rename, fsync the directory."""
    replace_atomic(path, data)


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


class _ShardedStore:
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
        _atomic_write(self.directory / INDEX, json.dumps(document, separators=(",", ":")).encode())

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
            _atomic_write(self.directory / shard_name(shard_id), data)
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


class LatentStore(_ShardedStore):
    """VAE posteriors (mean, std) per sample key, optionally also of the mirrored image."""

    def __init__(self, vae: torch.nn.Module, directory: Path, identity: dict[str, str], shard_size: int,
                 max_cached_bytes: int):
        super().__init__(directory, identity, shard_size, max_cached_bytes)
        self.vae = vae

    def missing(self, keys: Iterable[str], flip: bool = False) -> list[str]:
        """Keys (unique, in order) to encode; with `flip`, also those cached without their mirror."""
        return self._missing(keys, LATENT_TENSORS | FLIP_TENSORS if flip else LATENT_TENSORS)

    def add(self, keys: Sequence[str], images: torch.Tensor, flip: bool = False,
            only: Collection[str] | None = None) -> None:
        """Encode images (B, 3, H, W) in [-1, 1] (and their mirrors, with `flip`) and buffer the rows.

        With `only`, the whole batch is still encoded but just those keys' rows are kept: CPU
        kernels round differently by batch size, so a row then does not depend on which of
        its batch-mates happened to be cached already.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB in [-1, 1]; got shape {tuple(images.shape)}")
        if len(keys) != len(images):
            raise ValueError(f"{len(keys)} keys for {len(images)} images")
        if images.numel() and (images.min() < -1.001 or images.max() > 1.001):
            raise ValueError(f"images range over [{images.min():.3g}, {images.max():.3g}]; the VAE expects "
                             "[-1, 1] (x / 127.5 - 1 for 8-bit pixels)")
        wanted = set(keys if only is None else only)
        rows = [i for i, key in enumerate(keys) if key in wanted]
        if not rows:
            return
        tensors = dict(zip(("mean", "std"), self._encode(images)))
        if flip:
            tensors.update(zip(("flip_mean", "flip_std"), self._encode(images.flip(-1))))
        if len(rows) < len(keys):
            tensors = {name: rows_of[rows] for name, rows_of in tensors.items()}
        self._append([keys[i] for i in rows], tensors)

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        param = next(self.vae.parameters())
        posterior = self.vae.encode(images.to(param.device, param.dtype)).latent_dist
        return posterior.mean.float().cpu(), posterior.std.float().cpu()

    def get(self, keys: Sequence[str], flipped: bool | torch.Tensor = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (N, C, h, w) float32; `flipped` (a bool or (N,) bools) picks the mirrored rows."""
        if isinstance(flipped, bool):
            if not flipped:
                rows = self._gather(keys, LATENT_TENSORS)
                return rows["mean"], rows["std"]
            rows = self._gather(keys, FLIP_TENSORS)
            return rows["flip_mean"], rows["flip_std"]
        mask = torch.as_tensor(flipped, dtype=torch.bool).reshape(-1)
        if len(mask) != len(keys):
            raise ValueError(f"flipped has {len(mask)} entries for {len(keys)} keys")
        if not mask.any():
            return self.get(keys, False)
        rows = self._gather(keys, LATENT_TENSORS | FLIP_TENSORS)
        where = mask.view(-1, *([1] * (rows["mean"].ndim - 1)))
        return torch.where(where, rows["flip_mean"], rows["mean"]), torch.where(where, rows["flip_std"], rows["std"])


class TextStore(_ShardedStore):
    """Caption embeddings (L, D), keyed by the BLAKE3 of the caption."""

    def __init__(self, text_encoder, directory: Path, identity: dict[str, str], shard_size: int,
                 max_cached_bytes: int):
        super().__init__(directory, identity, shard_size, max_cached_bytes)
        self.text_encoder = text_encoder

    def missing(self, captions: Iterable[str]) -> list[str]:
        """Captions (unique, in order) not cached yet."""
        captions = list(dict.fromkeys(captions))
        absent = set(self._missing([caption_key(c) for c in captions], TEXT_TENSORS))
        return [c for c in captions if caption_key(c) in absent]

    def add(self, captions: Iterable[str]) -> None:
        """Encode the distinct captions given and buffer their embeddings."""
        captions = list(dict.fromkeys(captions))
        for start in range(0, len(captions), self.shard_size):
            chunk = captions[start : start + self.shard_size]
            embeddings = self.text_encoder.encode(chunk)  # (n, L, D)
            self._append([caption_key(c) for c in chunk], {"embedding": embeddings})

    def get(self, captions: Sequence[str]) -> torch.Tensor:
        """(N, L, D) float32 embeddings, in the order given."""
        return self._gather([caption_key(c) for c in captions], TEXT_TENSORS)["embedding"]


class FeatureCache:
    """A cache root holding a latents namespace per (VAE, transform) and a text namespace per encoder."""

    def __init__(self, root: str | Path, shard_size: int = DEFAULT_SHARD_SIZE,
                 max_cached_bytes: int = DEFAULT_MAX_CACHED_BYTES):
        self.root = Path(root).expanduser()
        self.shard_size = shard_size
        self.max_cached_bytes = max_cached_bytes

    def latents(self, vae: torch.nn.Module, transform_id: str, fingerprint: str | None = None) -> LatentStore:
        """The store for this VAE (by `vae_fingerprint`, or the one given) and image transform.

        `transform_id` names everything that turns the stored image into the VAE's input
        (resolution, resize, crop), e.g. "cover-center-512x512": a different transform is
        a different namespace.
        """
        if not transform_id:
            raise ValueError("transform_id is empty: name the resize/crop that made the images, e.g. 'center-512'")
        fingerprint = fingerprint or vae_fingerprint(vae)
        transform = "transform-" + blake3.blake3(transform_id.encode()).hexdigest()[:16]
        directory = self.root / "latents" / _path_component(fingerprint) / transform
        identity = {"kind": "latents", "vae": fingerprint, "transform_id": transform_id}
        return LatentStore(vae, directory, identity, self.shard_size, self.max_cached_bytes)

    def text(self, text_encoder) -> TextStore:
        """The store for this text encoder (by its `fingerprint`)."""
        fingerprint = str(text_encoder.fingerprint)
        directory = self.root / "text" / _path_component(fingerprint)
        identity = {"kind": "text", "text_encoder": fingerprint}
        return TextStore(text_encoder, directory, identity, self.shard_size, self.max_cached_bytes)
