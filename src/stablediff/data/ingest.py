"""Decode, judge and frame samples, in worker processes when asked, always in source order.

The work per sample (decode, check, EXIF/RGB, resize, crop) is a pure function
of the sample (`prepare`), so it can run in a pool of `num_workers` processes.
What depends on order stays in the calling process: the duplicate check
(`Validator.record`), the quarantine and the `limit`. Results are consumed in
submission order, so the output (images, captions, quarantine lines) is the
same for any number of workers. Reading the source also stays here: sources
stream (tar, parquet) and must not be read once per worker.

At most `num_workers * PREFETCH_CHUNKS` chunks are in flight, so memory stays
bounded however large the source is. With workers, a byte-identical copy of an
accepted sample is decoded before it is found to be a duplicate; without them
it costs only a hash.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image

from stablediff.data.crop_policy import CropPolicy, center_square
from stablediff.data.sources.base import RawSample
from stablediff.data.transforms import upright_rgb
from stablediff.data.validate import ValidationConfig, Validator, SampleVerdict, judge_image
from stablediff.errors import ConfigError

T = TypeVar("T")

CHUNK_SIZE = 8  # samples per task: amortises the inter-process round trip
PREFETCH_CHUNKS = 2  # per worker, as torch's DataLoader prefetch_factor


def default_num_workers() -> int:
    """min(4, CPU cores available to this process)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return min(4, cores)


@dataclass(frozen=True)
class IngestTask:
    """What a worker needs to prepare a sample (small: sent with every chunk)."""

    validation: ValidationConfig
    crop_policy: CropPolicy
    resolution: int  # side of the square centre crop the VAE stage uses


@dataclass(frozen=True)
class PreparedSample:
    """An accepted sample's pixels: its bucket, its crops and its square centre crop."""

    bucket: int
    crops: list[np.ndarray]  # per crop variant, (h, w, 3) uint8 in its bucket
    square: np.ndarray  # (R, R, 3) uint8


def prepare_image(image: Image.Image, key: str, task: IngestTask) -> PreparedSample:
    upright = upright_rgb(image)
    bucket, crops = task.crop_policy.frame(upright, key)
    square = crops[0] if task.crop_policy.is_square_center(task.resolution) else center_square(upright, task.resolution)
    return PreparedSample(bucket, crops, square)


def prepare(sample: RawSample, task: IngestTask) -> tuple[SampleVerdict, PreparedSample | None]:
    """The sample's own verdict (duplicates are judged later, in order) and, if accepted, its pixels."""
    verdict, image = judge_image(sample, task.validation)
    return verdict, prepare_image(image, verdict.content_hash, task) if verdict.ok else None


def _prepare_chunk(chunk: list[RawSample], task: IngestTask) -> list[tuple[SampleVerdict, PreparedSample | None]]:
    return [prepare(sample, task) for sample in chunk]


def ingest(samples: Iterable[RawSample], validator: Validator, task: IngestTask,
           num_workers: int = 0) -> Iterator[tuple[RawSample, SampleVerdict, PreparedSample | None]]:
    """Every sample with its final verdict and, if accepted, its pixels, in source order.

    Stop early by closing the iterator (a `break`): unfinished work is cancelled.
    """
    if num_workers < 0:
        raise ConfigError(f"data.num_workers must be 0 or more, got {num_workers}")
    if num_workers == 0:
        for sample in samples:
            verdict = validator.judge(sample)
            prepared = prepare_image(validator.last_image, verdict.content_hash, task) if verdict.ok else None
            yield sample, verdict, prepared
        return
    for sample, (verdict, prepared) in _pooled(samples, task, num_workers):
        verdict = validator.record(sample, verdict)
        yield sample, verdict, prepared if verdict.ok else None


def _pooled(samples: Iterable[RawSample], task: IngestTask,
            num_workers: int) -> Iterator[tuple[RawSample, tuple[SampleVerdict, PreparedSample | None]]]:
    pending: deque[tuple[list[RawSample], Future]] = deque()
    pool = ProcessPoolExecutor(num_workers, mp_context=_context())
    try:
        for chunk in chunks(samples, CHUNK_SIZE):
            pending.append((chunk, pool.submit(_prepare_chunk, chunk, task)))
            if len(pending) >= num_workers * PREFETCH_CHUNKS:
                yield from _results(pending.popleft())
        while pending:
            yield from _results(pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _results(entry: tuple[list[RawSample], Future],
             ) -> Iterator[tuple[RawSample, tuple[SampleVerdict, PreparedSample | None]]]:
    chunk, future = entry
    yield from zip(chunk, future.result())


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last may be shorter), read lazily."""
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _context() -> multiprocessing.context.BaseContext:
    """fork where there is one, as torch's DataLoader does on Linux: a worker starts in
    milliseconds, imports nothing, and runs only PIL/numpy code, none of the parent's torch
    threads. (forkserver and spawn re-import the main script, e.g. the CLI and torch, in every
    worker: seconds each.) Elsewhere spawn, which needs the usual `if __name__ == "__main__"` guard."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")
