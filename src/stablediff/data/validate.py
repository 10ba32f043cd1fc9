"""Judge every sample before it reaches training, and say why a reject was rejected.

A bad sample never crashes a run: the validator turns each failure into a
`SampleVerdict` with one of the reasons below, the `Quarantine` records it in
`RUN_DIR/quarantine.jsonl`, and `check_reject_fraction` stops the run with a
clear error only when rejects exceed `data.max_reject_fraction`.
"""

from __future__ import annotations

import io
import json
import threading
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import blake3
from PIL import Image, UnidentifiedImageError

from stablediff.data.sources.base import RawSample
from stablediff.errors import DataError
from stablediff.io.run_files import cut_torn_tail, read_lines

# Reasons, exact strings: tests, reports and quarantine.jsonl use them.
IMAGE_REASONS = ("zero_bytes", "undecodable", "truncated", "decompression_bomb", "too_small",
                 "max_aspect", "unsupported_mode")
CAPTION_REASONS = ("missing_caption", "caption_not_utf8")
# Known to the source before any decoding: macOS litter, I/O that failed after
# retries, an index row naming a file that is not there, an unparseable index row,
# a table's image path that leaves the dataset's folder (see `sources.base.confined_path`).
SOURCE_REASONS = ("resource_fork", "read_error", "missing_image", "bad_metadata", "outside_root")
REASONS = (*IMAGE_REASONS, *CAPTION_REASONS, "duplicate", *SOURCE_REASONS)

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default: ~0.25 GB of RGBA at 4 bytes a pixel
DEFAULT_MIN_SIZE = 8
# Longer side / shorter side. Past this an image is a strip (a 10,000,000x8 PNG is under the pixel
# limit), and resizing it to cover a training square would make hundreds of millions of pixels.
DEFAULT_MAX_ASPECT = 20.0
# Modes `transforms.to_rgb` turns into RGB faithfully; anything else (LAB, HSV,
# float) would need colour management we do not do, so it is a reject.
SUPPORTED_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX",
                             "CMYK", "YCbCr", "I", "I;16", "I;16L", "I;16B", "I;16N"})
EXIF_ORIENTATION = 0x0112
_PIL_GLOBALS = threading.Lock()  # MAX_IMAGE_PIXELS and the warning filters are process-wide


@dataclass(frozen=True)
class ValidationConfig:
    min_size: int = DEFAULT_MIN_SIZE  # smallest allowed side, in pixels, after EXIF rotation
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are decompression bombs
    max_aspect: float = DEFAULT_MAX_ASPECT  # longer side / shorter side; more is a `max_aspect` reject
    dedupe: bool = True  # reject byte-identical copies of an accepted sample


DEFAULT_VALIDATION = ValidationConfig()


@dataclass(frozen=True)
class SampleVerdict:
    """The judgement of one sample. Width and height are as displayed (EXIF rotation applied)."""

    ok: bool
    reason: str | None = None
    detail: str = ""
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    content_hash: str | None = None


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class TooManyRejectsError(DataError):
    """More samples were rejected than `data.max_reject_fraction` allows."""


def content_hash(data: bytes) -> str:
    """The BLAKE3 hex digest of the encoded bytes: the sample's identity for dedupe and caches."""
    return blake3.blake3(data).hexdigest()


@contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's bomb check at our limit; its warning (limit < pixels < 2x limit) made an error."""
    with _PIL_GLOBALS, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation: orientations 5-8 swap the sides."""
    width, height = image.size
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to reject the pixels
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("decompression_bomb",
                            f"over the limit of {max_pixels:,} pixels (Pillow: {exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected("undecodable", "not an image Pillow can identify") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a corrupt header
        raise ImageRejected("undecodable", f"{type(exc).__name__}: {exc}") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected("decompression_bomb",
                            f"{width}x{height} = {width * height:,} pixels, "
                            f"over the limit of {max_pixels:,}")
    return image


def _check_aspect(size: tuple[int, int], max_aspect: float) -> None:
    width, height = size
    aspect = max(width, height) / max(1, min(width, height))
    if aspect > max_aspect:
        raise ImageRejected("max_aspect", f"{width}x{height}: the aspect ratio {aspect:,.1f}:1 is over "
                                          f"data.max_aspect = {max_aspect:g}")


def _load(image: Image.Image) -> None:
    """Decode every pixel: a truncated file opens fine and fails only here."""
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("decompression_bomb", str(exc)) from exc
    except (OSError, EOFError, SyntaxError) as exc:
        text = str(exc)
        lowered = text.lower()
        truncated = isinstance(exc, EOFError) or "truncat" in lowered or "end of" in lowered
        raise ImageRejected("truncated" if truncated else "undecodable",
                            f"{type(exc).__name__}: {text}") from exc
    except ValueError as exc:
        # PNG text/ICC chunks that inflate past Pillow's limit are bombs too.
        reason = "decompression_bomb" if "too large" in str(exc).lower() else "undecodable"
        raise ImageRejected(reason, f"ValueError: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a corrupt stream must not end the run
        raise ImageRejected("undecodable", f"{type(exc).__name__}: {exc}") from exc


def decode_image(data: bytes, config: ValidationConfig = DEFAULT_VALIDATION) -> Image.Image:
    """Open and fully load an image, or raise `ImageRejected` with the reason.

    The image is returned as stored (mode and orientation untouched);
    `transforms.upright_rgb` makes it training-ready.
    """
    if not data:
        raise ImageRejected("zero_bytes", "the file is empty")
    # Pillow checks the pixel count when it reads the header, in open(); the
    # lock on its globals is held only for that, so pixel decoding (which
    # releases the GIL) still runs in parallel threads.
    with pixel_limit(config.max_pixels):
        image = _open(data, config.max_pixels)
    if image.mode not in SUPPORTED_MODES:
        raise ImageRejected("unsupported_mode",
                            f"mode {image.mode} ({image.format}); convert it to RGB first")
    _check_aspect(image.size, config.max_aspect)  # from the header: such a strip is never decoded
    _load(image)
    width, height = displayed_size(image)
    if min(width, height) < config.min_size:
        raise ImageRejected("too_small", f"{width}x{height}: a side is under the minimum of "
                                         f"{config.min_size} px")
    return image


def judge_image(sample: RawSample, config: ValidationConfig = DEFAULT_VALIDATION,
                digest: str | None = None) -> tuple[SampleVerdict, Image.Image | None]:
    """The sample's verdict on its own (no duplicate check) and, if accepted, its decoded image.

    Pure in its inputs, so it can run in a worker process; `Validator.record`
    then applies the order-dependent duplicate check.
    """
    if sample.reject is not None:
        return SampleVerdict(False, sample.reject, sample.detail), None
    digest = digest or content_hash(sample.image_bytes)
    try:
        image = decode_image(sample.image_bytes, config)
    except ImageRejected as rejected:
        return SampleVerdict(False, rejected.reason, rejected.detail, content_hash=digest), None
    width, height = displayed_size(image)
    if sample.caption_error is not None:
        detail = ("no caption found" if sample.caption_error == "missing_caption"
                  else "the caption is not valid UTF-8; re-save it as UTF-8")
        return SampleVerdict(False, sample.caption_error, detail, width, height, image.mode, digest), None
    return SampleVerdict(True, None, "", width, height, image.mode, digest), image


class Validator:
    """Judges samples one after another; remembers accepted hashes to reject duplicates.

    `total` and `rejects` (a Counter by reason) add up what it has judged.
    """

    def __init__(self, config: ValidationConfig = DEFAULT_VALIDATION) -> None:
        self.config = config
        self._first_seen: dict[str, str] = {}  # content hash -> key of the kept sample
        self.total = 0
        self.rejects: Counter[str] = Counter()
        # The decoded image of the last accepted sample, so a loader need not decode it twice.
        self.last_image: Image.Image | None = None

    def judge(self, sample: RawSample) -> SampleVerdict:
        self.last_image = None
        if sample.reject is not None:
            return self.record(sample, SampleVerdict(False, sample.reject, sample.detail))
        digest = content_hash(sample.image_bytes)
        if self.duplicate_of(digest) is not None:  # checked before decoding: a copy costs one hash
            return self.record(sample, SampleVerdict(False, content_hash=digest))
        verdict, self.last_image = judge_image(sample, self.config, digest)
        return self.record(sample, verdict)

    def duplicate_of(self, digest: str | None) -> str | None:
        """The key of an accepted sample with these bytes, if any (and dedupe is on)."""
        return self._first_seen.get(digest) if self.config.dedupe and digest else None

    def record(self, sample: RawSample, verdict: SampleVerdict) -> SampleVerdict:
        """Count a verdict from `judge_image`, in source order; a copy of an accepted sample
        becomes a `duplicate`, whatever else was wrong with it."""
        kept = self.duplicate_of(verdict.content_hash) if sample.reject is None else None
        if kept is not None:
            verdict = SampleVerdict(False, "duplicate", f"same bytes as {kept}", content_hash=verdict.content_hash)
        self.total += 1
        if verdict.ok:
            if self.config.dedupe:
                self._first_seen[verdict.content_hash] = sample.key
        else:
            self.rejects[verdict.reason] += 1
        return verdict


@dataclass
class Quarantine:
    """Appends a JSON line `{key, origin, reason, detail}` per reject to RUN_DIR/quarantine.jsonl.

    Each line is flushed as it is written, so the record survives a crash. A resumed
    run judges the same files again: a reject already in the file is not written twice
    (each rejected file once), and a torn last line of a killed run is cut off first.
    """

    run_dir: str | Path
    filename: str = "quarantine.jsonl"
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.path = Path(self.run_dir) / self.filename
        self._file = None
        self._recorded: set[tuple] = set()

    def add(self, sample: RawSample, verdict: SampleVerdict) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._recorded = {_reject_id(r) for _, r in read_lines(self.path) if r is not None}
            cut_torn_tail(self.path)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across adds
        record = {"key": sample.key, "origin": sample.origin, "reason": verdict.reason,
                  "detail": verdict.detail}
        self.counts[verdict.reason] += 1
        if _reject_id(record) in self._recorded:
            return
        self._recorded.add(_reject_id(record))
        # ensure_ascii: keys from non-UTF-8 file names carry lone surrogates.
        self._file.write(json.dumps(record, ensure_ascii=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Quarantine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _reject_id(record: dict) -> tuple:
    """What makes two quarantine lines the same reject: the sample and the reason (the detail is prose)."""
    return record.get("origin"), record.get("key"), record.get("reason")


def check_reject_fraction(rejected: int | Mapping[str, int], total: int, max_fraction: float,
                          quarantine_path: str | Path | None = None) -> None:
    """Raise `TooManyRejectsError` when rejected/total exceeds `max_fraction`.

    `rejected` is a count, or counts by reason (then the top reasons are named).
    """
    counts = dict(rejected) if isinstance(rejected, Mapping) else {}
    num_rejected = sum(counts.values()) if isinstance(rejected, Mapping) else int(rejected)
    if total <= 0:
        raise DataError("the data source yielded no samples; check data.source "
                        "(`stablediff data check SOURCE` lists what it finds)")
    fraction = num_rejected / total
    if fraction <= max_fraction:
        return
    top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:3]
    reasons = f" Top reasons: {', '.join(f'{r} {n}' for r, n in top)}." if top else ""
    where = quarantine_path or "RUN_DIR/quarantine.jsonl"
    raise TooManyRejectsError(
        f"{num_rejected} of {total} samples ({fraction:.1%}) were rejected, more than "
        f"data.max_reject_fraction = {max_fraction:g} ({max_fraction:.1%}).{reasons} "
        f"Each reject and its reason is in {where} (or run `stablediff data check SOURCE`); "
        "fix or remove those files, or raise data.max_reject_fraction."
    )
