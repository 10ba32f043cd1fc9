"""PNG metadata in the A1111 "infotext" form, so other tools read the parameters back.

    a handwritten digit seven
    Negative prompt: blurry
    Steps: 20, Sampler: dpmpp_2m, CFG scale: 3.0, Seed: 7, Size: 32x32, Model hash: 1a2b3c4d5e, Model: digits

The `parameters` text chunk holds exactly that text (what A1111, ComfyUI and
Civitai read). A second chunk, `stablediff`, holds JSON with *where* the model,
LoRAs and input images were (paths are not part of infotext); `generate
--from-png` reads parameters from the infotext and locations from that chunk.
Those paths are relative to the PNG's folder (absolute only with `--embed-paths`),
so a shared image does not tell user names or folder layouts.

Hashes are A1111's "AutoV2": the first 10 hex digits of the SHA-256 of the
whole file, so a hash printed here matches the one Civitai shows for a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from stablediff.errors import GenerationError
from stablediff.models.file_hash import file_hashes

PARAMETERS_KEY = "parameters"
LOCATIONS_KEY = "stablediff"
SHORT_HASH_LENGTH = 10

# One `Key: value` pair of the last line; a value with a comma, colon or quote is JSON-quoted
# (the same rule as A1111's infotext, so its parser and ours read each other's text).
_PARAM = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"


def infotext(prompt: str, negative_prompt: str | None, params: dict[str, object]) -> str:
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{_NEGATIVE} {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in params.items() if value is not None))
    return "\n".join(lines)


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


@dataclass(frozen=True)
class Infotext:
    prompt: str
    negative_prompt: str | None
    params: dict[str, str] = field(default_factory=dict)


def parse_infotext(text: str) -> Infotext:
    """Inverse of `infotext`: prompt, negative prompt and the parameter line as strings."""
    lines = text.strip("\n").split("\n")
    params: dict[str, str] = {}
    candidate = dict(_pairs(lines[-1]))
    if len(candidate) >= 3:  # A1111's rule: a prompt line may hold a stray `word: value`
        params, lines = candidate, lines[:-1]
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative, line = True, line[len(_NEGATIVE):].lstrip(" ")
        (negative_lines if in_negative else prompt_lines).append(line)
    negative = "\n".join(negative_lines) if in_negative else None
    return Infotext("\n".join(prompt_lines), negative or None, params)


def _pairs(line: str):
    position = 0
    while position < len(line):
        match = _PARAM.match(line, position)
        if not match or match.end() == position:
            return
        key, value = match[1].strip(), match[2].strip()
        yield key, json.loads(value) if value.startswith('"') else value
        position = match.end()


def png_info(text: str, locations: dict | None = None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, text)
    if locations:
        info.add_text(LOCATIONS_KEY, json.dumps(locations, sort_keys=True))
    return info


def read_png_metadata(path: Path) -> tuple[Infotext, dict]:
    """The infotext and the locations JSON (empty when absent, e.g. an A1111 image), its paths made
    absolute again (they are stored relative to the PNG's folder)."""
    try:
        with Image.open(path) as image:
            chunks = dict(getattr(image, "text", {}) or image.info)
    except (OSError, ValueError) as exc:
        raise GenerationError(f"{path}: cannot read it as an image ({exc}); give a PNG written by "
                              "`stablediff generate` or A1111") from None
    text = chunks.get(PARAMETERS_KEY)
    if not isinstance(text, str) or not text.strip():
        raise GenerationError(f"{path} has no `parameters` text chunk, so it does not say how it was made; give a PNG "
                              "written by `stablediff generate` or A1111 (some sites and editors strip PNG text chunks)")
    try:
        locations = json.loads(chunks.get(LOCATIONS_KEY) or "{}")
    except json.JSONDecodeError:
        locations = {}
    locations = locations_resolved(locations, Path(path).parent) if isinstance(locations, dict) else {}
    return parse_infotext(text), locations


def _map_paths(locations: dict, change) -> dict:
    """`locations` with `change` applied to each path in it (model, init, mask, every LoRA and embedding)."""
    mapped = dict(locations)
    for key in ("model", "init", "mask"):
        if isinstance(mapped.get(key), str):
            mapped[key] = change(mapped[key])
    for key in ("loras", "embeddings"):
        if isinstance(mapped.get(key), dict):
            mapped[key] = {name: change(p) if isinstance(p, str) else p for name, p in mapped[key].items()}
    return mapped


def locations_relative_to(locations: dict, folder: Path) -> dict:
    """The paths of `locations` relative to `folder` (the PNG's), as the `stablediff` chunk stores them."""
    start = os.path.realpath(folder)

    def relative(path: str) -> str:
        try:
            return os.path.relpath(path, start)
        except ValueError:  # another drive (Windows): no relative path exists
            return path

    return _map_paths(locations, relative)


def locations_resolved(locations: dict, folder: Path) -> dict:
    """Inverse of `locations_relative_to`; absolute paths (`--embed-paths`) stay as they are."""
    return _map_paths(locations, lambda path: os.path.normpath(os.path.join(os.path.realpath(folder), path)))


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_short_hash(path: Path) -> str:
    """AutoV2 hash of a file, cached by (path, size, mtime) since models are gigabytes."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = file_hashes(path)["autov2"]
    return _HASH_CACHE[key]


def bytes_short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:SHORT_HASH_LENGTH]
