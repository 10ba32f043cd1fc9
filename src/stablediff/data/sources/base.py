"""What every source yields, and the small rules all sources share.

A source turns some on-disk layout into a stream of `RawSample`s: the image's
undecoded bytes, its caption (or why there is none), and where it came from.
Sources never decode images and never raise for one bad sample: a sample they
already know is bad (a macOS resource fork, an unreadable file, a caption
without its image) is yielded with `reject` set, so the validator can record
it in the quarantine like any other reject.
"""

from __future__ import annotations

import posixpath
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal, TypeVar

import fsspec

from stablediff.errors import DataError

CaptionPolicy = Literal["error", "empty", "filename"]
CAPTION_POLICIES: tuple[str, ...] = ("error", "empty", "filename")

# Extensions read as images. The validator, not the extension, decides whether
# the bytes really are one (a text file named .png is an `undecodable` reject).
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})

T = TypeVar("T")


@dataclass(frozen=True)
class RawSample:
    """One undecoded sample as a source found it.

    `caption_error` is `missing_caption` or `caption_not_utf8` when the caption
    could not be had; `reject` is a reason the source already knows the whole
    sample is unusable (`resource_fork`, `read_error`, `missing_image`), with
    `detail` saying more.
    """

    key: str
    image_bytes: bytes
    caption: str | None
    caption_error: str | None
    origin: str
    reject: str | None = None
    detail: str = ""


class SourceError(DataError):
    """A data source that cannot be opened: missing, unknown format, malformed index."""


class Source(ABC):
    """An iterable of `RawSample`s; iterating again starts from the beginning."""

    spec: str

    @abstractmethod
    def __iter__(self) -> Iterator[RawSample]: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def with_retry(fn: Callable[[], T], what: str, tries: int = 3, base_delay: float = 0.2) -> T:
    """Call `fn`, retrying transient I/O errors with exponential backoff.

    Network filesystems and busy disks fail transiently; a missing file or a
    permission problem will not fix itself, so those are raised at once.
    """
    permanent = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
    for attempt in range(tries):
        try:
            return fn()
        except permanent:
            raise
        except OSError as exc:
            if attempt == tries - 1:
                raise OSError(f"reading {what} failed {tries} times: {exc}") from exc
            time.sleep(base_delay * (2**attempt))
    raise AssertionError("unreachable")


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return with_retry(lambda: fs.cat_file(path), path)


def decode_caption(raw: bytes | str | None, stem: str,
                   policy: CaptionPolicy) -> tuple[str | None, str | None]:
    """(caption, error) from caption bytes or text, applying the missing-caption policy.

    Bytes are decoded as strict UTF-8 (a UTF-8 byte-order mark is allowed).
    Text that was decoded with `surrogateescape` carries lone surrogates where
    the file had non-UTF-8 bytes; that is reported the same way.
    """
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            return None, "caption_not_utf8"
    if isinstance(raw, str) and has_escaped_bytes(raw):
        return None, "caption_not_utf8"
    if raw is None:
        return missing_caption(stem, policy)
    return raw.strip(), None


def missing_caption(stem: str, policy: CaptionPolicy) -> tuple[str | None, str | None]:
    if policy == "empty":
        return "", None
    if policy == "filename":
        return stem.replace("_", " ").replace("-", " ").strip(), None
    return None, "missing_caption"


def has_escaped_bytes(text: str) -> bool:
    """True when `text` holds bytes that `surrogateescape` kept from a failed UTF-8 decode."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def check_policy(policy: str) -> CaptionPolicy:
    if policy not in CAPTION_POLICIES:
        raise SourceError(
            f"unknown caption policy {policy!r}; use one of {', '.join(CAPTION_POLICIES)}"
        )
    return policy  # type: ignore[return-value]


def extension(path: str) -> str:
    return PurePosixPath(path).suffix.lower().lstrip(".")


def is_resource_fork(path: str) -> bool:
    """macOS litter: AppleDouble `._name` files and anything under `__MACOSX/`."""
    parts = PurePosixPath(path).parts
    return "__MACOSX" in parts or PurePosixPath(path).name.startswith("._")


def is_hidden(path: str) -> bool:
    """Dotfiles and dot-directories (.DS_Store, .git, .cache) that are not resource forks."""
    return any(part.startswith(".") for part in PurePosixPath(path).parts)


def is_saved_dataset(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return fs.isfile(f"{root}/state.json") or fs.isfile(f"{root}/dataset_dict.json")


def classify(path: str) -> str:
    """`resource_fork`, `image`, or `other` (hidden files, captions, anything not an image)."""
    is_image = extension(path) in IMAGE_EXTENSIONS
    if is_resource_fork(path):
        return "resource_fork" if is_image else "other"
    if is_hidden(path) or not is_image:
        return "other"
    return "image"


def resource_fork_sample(key: str, origin: str) -> RawSample:
    return RawSample(key, b"", None, None, origin, reject="resource_fork",
                     detail="macOS metadata file (AppleDouble/__MACOSX), not an image")


def confined_path(root: str, path: str, allow_outside: bool = False) -> str | None:
    """The file a table's image path names under `root`, or None when the path leaves it.

    A table's path column is data, not configuration: absolute paths (`/etc/..`, `C:\\..`,
    a URL) and `..` that climb out of the dataset's folder would read any file of the
    machine into a model, so they count only with `data.allow_outside_paths: true`.
    """
    root = root.rstrip("/")
    is_absolute = path.startswith(("/", "\\")) or bool(re.match(r"[A-Za-z]:|[a-z][\w+.-]*://", path))
    if is_absolute:
        return path if allow_outside else None
    joined = posixpath.normpath(f"{root}/{path}")
    if allow_outside or joined.startswith(f"{root}/"):
        return joined
    return None


def outside_root_sample(key: str, origin: str, path: str, root: str) -> RawSample:
    return RawSample(key, b"", None, None, origin, reject="outside_root",
                     detail=f"the image path {path!r} points outside the dataset folder {root}; "
                            "set data.allow_outside_paths: true to read it")


def read_error_sample(key: str, origin: str, exc: BaseException) -> RawSample:
    return RawSample(key, b"", None, None, origin, reject="read_error", detail=str(exc))
