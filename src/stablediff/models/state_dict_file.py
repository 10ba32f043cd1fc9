"""Read a single model file into a flat state dict: safetensors, or a trusted pickle `.ckpt`.

A safetensors file is checked before its tensors are touched: a torn download
(header naming more bytes than the file has) or a file that is not safetensors
at all is a clear error, not a stack trace from deep inside a loader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from stablediff.io.pickle_guard import refuse_pickle
from stablediff.errors import MissingPathError, ModelFileError

META = "stablediff."  # prefix of the metadata entries our exports add (configs, tokenizer, recipe)
_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors format's own bound on the JSON header


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """({tensor name: {"dtype", "shape", "data_offsets"}}, metadata) of a safetensors file, verified
    against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(_not_safetensors(path, "it is shorter than a safetensors header"))
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= min(_HEADER_LIMIT, size - 8):
            raise ModelFileError(_not_safetensors(path, "its first 8 bytes are not a valid header length"))
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFileError(_not_safetensors(path, f"its header is not valid JSON ({exc})")) from None
    if not isinstance(header, dict):
        raise ModelFileError(_not_safetensors(path, "its header is not a JSON object"))
    metadata = header.pop("__metadata__", None) or {}
    end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    if 8 + length + end > size:
        raise ModelFileError(f"{path} is truncated: its header describes {end:,} bytes of tensors but only "
                             f"{size - 8 - length:,} are in the file. Download or copy the file again.")
    return header, metadata


def _not_safetensors(path: Path, why: str) -> str:
    return (f"{path} cannot be read as a safetensors file: {why}. The file is damaged or in another format; "
            "give a .safetensors model file, a diffusers folder, or a .ckpt with --trust-pickle.")


def header_shapes(header: dict[str, dict]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(entry["shape"]) for name, entry in header.items()}


def read_model_file(path: Path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a `.safetensors` file, or of a pickle checkpoint when trusted."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"model file {path} does not exist; give a .safetensors file or a diffusers folder")
    kind = refuse_pickle(path, trust_pickle)  # raises for pickles unless trusted
    if kind in ("zip", "pickle") or (kind == "unknown" and path.suffix.lower() != ".safetensors"):
        return _read_pickle(path), {}
    header, metadata = read_header(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except SafetensorError as exc:
        raise ModelFileError(f"{path} is a damaged safetensors file ({exc}); download or copy it again") from None
    return state, metadata


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A trusted `.ckpt`: the Lightning `state_dict` entry (or the top level), tensors only."""
    try:  # from an open file: given a name ending in .safetensors, torch.load reads it as safetensors
        with open(path, "rb") as f:
            loaded = torch.load(f, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unpickling failure is a bad file, told in one line
        raise ModelFileError(f"{path} could not be unpickled ({type(exc).__name__}: {exc}); the file is damaged "
                             "or not a PyTorch checkpoint") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ModelFileError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")
    return {k: v for k, v in state.items() if torch.is_tensor(v)}
