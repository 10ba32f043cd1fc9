"""WebDataset `.tar` shards: members grouped by key, `0001.jpg` + `0001.txt` is one sample.

The key of a member is its path up to the first dot of its file name, as in
webdataset; members of one sample are adjacent in the shard, so a shard is
read as a stream (never extracted, never seeked), which also works for
remote and gzip-compressed shards. A shard that is cut short yields the
samples before the cut and one `read_error` reject naming where it broke.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import PurePosixPath

import fsspec

from stablediff.data.sources.base import (
    IMAGE_EXTENSIONS,
    CaptionPolicy,
    RawSample,
    Source,
    SourceError,
    decode_caption,
    is_hidden,
    is_resource_fork,
    read_error_sample,
    resource_fork_sample,
    with_retry,
)

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`shard-{000..002}.tar` -> three names; `{a,b}` -> two. The webdataset shard notation."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first)
        options = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for option in options for name in expand_braces(head + option + tail)]


def resolve_shards(spec: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The shard files a spec names (a path, a glob, or a brace pattern), sorted."""
    fs, _ = fsspec.core.url_to_fs(expand_braces(spec)[0])
    shards: list[str] = []
    for pattern in expand_braces(spec):
        _, path = fsspec.core.url_to_fs(pattern)
        if any(ch in path for ch in "*?["):
            shards.extend(fs.glob(path))
        elif fs.isfile(path):
            shards.append(path)
        else:
            raise SourceError(f"shard {pattern} does not exist")
    if not shards:
        raise SourceError(f"no .tar shards match {spec}")
    return fs, sorted(set(shards))


def split_key(name: str) -> tuple[str, str]:
    """`dir/0001.seg.png` -> (`dir/0001`, `seg.png`)."""
    path = PurePosixPath(name)
    stem, _, ext = path.name.partition(".")
    parent = str(path.parent)
    return (stem if parent == "." else f"{parent}/{stem}"), ext.lower()


def json_caption(data: bytes) -> bytes | str | None:
    """The `caption` or `text` field of a webdataset `.json` member; raw bytes if not UTF-8."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return data  # decode_caption reports it as caption_not_utf8
    except json.JSONDecodeError:
        return None
    if not isinstance(meta, dict):
        return None
    for field in ("caption", "text"):
        if isinstance(meta.get(field), str):
            return meta[field]
    return None


class TarSource(Source):
    """Samples from one or more webdataset shards."""

    def __init__(self, spec: str, caption_policy: CaptionPolicy = "error") -> None:
        self.spec = spec
        self.caption_policy = caption_policy
        self.fs, self.shards = resolve_shards(spec)

    def __iter__(self) -> Iterator[RawSample]:
        for shard in self.shards:
            yield from self._shard_samples(shard)

    def _shard_samples(self, shard: str) -> Iterator[RawSample]:
        key, members, last, end = None, {}, "(start)", 0
        try:
            with with_retry(lambda: self.fs.open(shard, "rb"), shard) as raw, \
                    tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    last = member.name
                    if is_resource_fork(member.name):
                        fork_key = str(PurePosixPath(member.name).with_suffix(""))
                        yield resource_fork_sample(fork_key, f"{shard}:{member.name}")
                        continue
                    if is_hidden(member.name):
                        continue
                    member_key, ext = split_key(member.name)
                    if member_key != key:
                        if key is not None:
                            yield self._group_sample(shard, key, members)
                        key, members = member_key, {}
                    members[ext] = tar.extractfile(member).read()
                end = tar.offset
        except (tarfile.TarError, OSError, EOFError) as exc:
            # The group being read when the shard broke may be incomplete: dropped.
            yield read_error_sample(key or shard, f"{shard}:{last}",
                                    OSError(f"shard unreadable after member {last}: {exc}"))
            return
        if key is not None:
            yield self._group_sample(shard, key, members)
        if self._cut_short(shard, end):
            yield read_error_sample(shard, f"{shard}:{last}", OSError(
                f"the shard ends after member {last} without tar's end-of-archive marker; it was "
                "probably cut short (an interrupted download or copy): re-create or re-fetch it"))

    def _cut_short(self, shard: str, end: int) -> bool:
        """A tar cut at a member boundary reads as complete; its missing end marker tells.

        Every tar ends with two zero blocks (1024 bytes) after the last member.
        Only checked for uncompressed shards, where offsets are file offsets;
        a cut gzip stream fails loudly on its own.
        """
        if not shard.lower().endswith(".tar"):
            return False
        try:
            return with_retry(lambda: self.fs.size(shard), shard) < end + 2 * tarfile.BLOCKSIZE
        except OSError:
            return False

    def _group_sample(self, shard: str, key: str, members: dict[str, bytes]) -> RawSample:
        image_ext = next((ext for ext in members if ext in IMAGE_EXTENSIONS), None)
        if image_ext is None:
            return RawSample(key, b"", None, None, f"{shard}:{key}", reject="missing_image",
                             detail=f"members {sorted(members)} but no image")
        if "txt" in members:
            raw: bytes | str | None = members["txt"]
        elif "caption" in members:
            raw = members["caption"]
        elif "json" in members:
            raw = json_caption(members["json"])
        else:
            raw = None
        caption, error = decode_caption(raw, PurePosixPath(key).name, self.caption_policy)
        return RawSample(key, members[image_ext], caption, error, f"{shard}:{key}.{image_ext}")
