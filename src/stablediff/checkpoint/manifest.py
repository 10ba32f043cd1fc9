"""The manifest: one JSON file per checkpoint, the checkpoint's commit point.

It names every chunk of every tensor, carries the trainer's `meta` and
`metrics`, and a BLAKE3 checksum over the canonical JSON of all other fields,
so a torn or bit-flipped manifest is recognised rather than trusted.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import blake3

from ._codec import DTYPE_SIZES, nbytes_of
from .errors import CheckpointError, ManifestError

FORMAT_VERSION = 1


def canonical_json(value: Any) -> bytes:
    """Key-sorted, whitespace-free JSON: the same data always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def plain_json(value: Any, what: str) -> Any:
    """Deep copy through JSON, so the saved value is exactly what a load gives back.

    Tuples come back as lists; a value JSON cannot hold raises here, in the
    training thread, instead of failing later in the background writer.
    """
    try:
        return json.loads(canonical_json(value))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {what} must be plain JSON (dict, list, str, int, float, bool, None): "
            f"{exc}. Put tensors and arrays into `tensors`, convert the rest to lists/str."
        ) from exc


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes, "chunks": list(self.chunks)}

    def chunk_sizes(self, chunk_bytes: int) -> list[int]:
        """Every chunk is `chunk_bytes` long except the last one of the tensor."""
        return [min(chunk_bytes, self.nbytes - i * chunk_bytes) for i in range(len(self.chunks))]


@dataclass(frozen=True)
class Manifest:
    step: int
    time: float
    chunk_bytes: int
    tensors: dict[str, TensorEntry]
    meta: dict[str, Any]
    metrics: dict[str, float]
    bytes_new: int
    bytes_total: int
    format_version: int = FORMAT_VERSION
    checksum: str = ""

    def body(self) -> dict[str, Any]:
        """Every field except the checksum, as JSON data."""
        return {
            "format_version": self.format_version,
            "step": self.step,
            "time": self.time,
            "chunk_bytes": self.chunk_bytes,
            "tensors": {name: entry.to_json() for name, entry in self.tensors.items()},
            "meta": self.meta,
            "metrics": self.metrics,
            "bytes_new": self.bytes_new,
            "bytes_total": self.bytes_total,
        }

    def sealed(self) -> Manifest:
        """The same manifest with its checksum filled in."""
        return replace(self, checksum=blake3.blake3(canonical_json(self.body())).hexdigest())

    def to_bytes(self) -> bytes:
        assert self.checksum, "seal the manifest before writing it"
        return canonical_json({**self.body(), "checksum": self.checksum}) + b"\n"

    def chunk_refs(self) -> dict[str, int]:
        """hash -> size of every chunk this checkpoint needs."""
        refs: dict[str, int] = {}
        for entry in self.tensors.values():
            refs.update(zip(entry.chunks, entry.chunk_sizes(self.chunk_bytes)))
        return refs


def build_manifest(
    step: int,
    chunk_bytes: int,
    tensors: dict[str, TensorEntry],
    meta: Mapping[str, Any] | None,
    metrics: Mapping[str, float] | None,
    bytes_new: int,
) -> Manifest:
    return Manifest(
        step=step,
        time=time.time(),
        chunk_bytes=chunk_bytes,
        tensors=tensors,
        meta=plain_json(dict(meta or {}), "meta"),
        metrics=plain_metrics(metrics),
        bytes_new=bytes_new,
        bytes_total=sum(e.nbytes for e in tensors.values()),
    ).sealed()


def plain_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    out = {}
    for key, value in (metrics or {}).items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"metric '{key}' must be a number, got {value!r}") from exc
    return out


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """Parse and verify a manifest; ManifestError says what is wrong with it."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"manifest {where} is not valid JSON (truncated or corrupt): {exc}") from exc
    if not isinstance(data, dict) or "checksum" not in data:
        raise ManifestError(f"manifest {where} has no checksum field (truncated or not a manifest)")
    stored = data.pop("checksum")
    actual = blake3.blake3(canonical_json(data)).hexdigest()
    if stored != actual:
        raise ManifestError(f"manifest {where} fails its checksum (corrupt)")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"manifest {where} has format version {data.get('format_version')!r}; this stablediff "
            f"reads version {FORMAT_VERSION}. Use the stablediff release that wrote it."
        )
    try:
        return _from_json(data, stored)
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"manifest {where} is malformed: {exc!r}") from exc


def _from_json(data: dict[str, Any], checksum: str) -> Manifest:
    tensors = {}
    for name, entry in data["tensors"].items():
        tensor = TensorEntry(entry["dtype"], tuple(entry["shape"]), int(entry["nbytes"]), tuple(entry["chunks"]))
        if tensor.dtype not in DTYPE_SIZES or nbytes_of(tensor.dtype, list(tensor.shape)) != tensor.nbytes:
            raise ValueError(f"tensor '{name}' has inconsistent dtype/shape/nbytes")
        tensors[name] = tensor
    return Manifest(
        step=int(data["step"]),
        time=float(data["time"]),
        chunk_bytes=int(data["chunk_bytes"]),
        tensors=tensors,
        meta=data["meta"],
        metrics={k: float(v) for k, v in data["metrics"].items()},
        bytes_new=int(data["bytes_new"]),
        bytes_total=int(data["bytes_total"]),
        format_version=int(data["format_version"]),
        checksum=checksum,
    )


@dataclass(frozen=True)
class ManifestSummary:
    """One line of `ckpt list`; `valid` is False when the manifest fails its checksum;
    `abandoned_by` is the number of the divergence rollback that abandoned it (lineage.py)."""

    step: int
    time: float | None
    bytes_total: int
    bytes_new: int
    metrics: dict[str, float] = field(default_factory=dict)
    valid: bool = True
    problem: str | None = None
    abandoned_by: int | None = None

    @staticmethod
    def of(manifest: Manifest) -> ManifestSummary:
        return ManifestSummary(
            manifest.step, manifest.time, manifest.bytes_total, manifest.bytes_new, dict(manifest.metrics)
        )

    def metric(self, name: str) -> float | None:
        value = self.metrics.get(name)
        return value if value is not None and math.isfinite(value) else None
