"""Refuse pickle-based checkpoint files unless the user explicitly trusts them.

Unpickling runs arbitrary code chosen by whoever made the file, so a
downloaded `.ckpt` is an executable. We look at the bytes, not only the name:
a renamed pickle is still a pickle, and a `.bin` that is really safetensors is fine.
"""

from __future__ import annotations

import os
import struct

import fsspec

from stablediff.errors import CheckpointError, ModelFileError

# The one list of pickle suffixes. Model weights saved by torch.save carry the first four;
# a model file is a safetensors file or one of those.
PICKLE_MODEL_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PICKLE_SUFFIXES = PICKLE_MODEL_SUFFIXES + (".pkl", ".pickle")
MODEL_FILE_SUFFIXES = (".safetensors",) + PICKLE_MODEL_SUFFIXES


class PickleRefusedError(ModelFileError, CheckpointError):
    """A pickle-based file was given without --trust-pickle.

    A model-file error; also a CheckpointError, as it was when only checkpoint code raised it.
    """


def sniff_format(head: bytes) -> str:
    """'zip' (torch.save), 'pickle' (legacy torch.save, raw pickle), 'safetensors' or 'unknown'."""
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocols 2-5
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len < 100 * 1024 * 1024:
            return "safetensors"
    return "unknown"


def refuse_pickle(path: str | os.PathLike, trust_pickle: bool = False) -> str:
    """Raise PickleRefusedError for a pickle-based file unless `trust_pickle`; return its format."""
    path = os.fspath(path)
    with fsspec.open(path, "rb") as f:
        kind = sniff_format(f.read(16))
    # Protocol 0/1 pickles have no magic bytes: a file we cannot recognise is treated as a pickle
    # unless it claims to be safetensors (then reading its header says what is wrong with it).
    is_pickle = kind in ("zip", "pickle") or (kind == "unknown" and not path.lower().endswith(".safetensors"))
    if is_pickle and not trust_pickle:
        raise PickleRefusedError(
            f"{path} is a pickle-based checkpoint ({kind} format); loading it can run arbitrary "
            f"code hidden in the file. Use a .safetensors version of it, or pass --trust-pickle "
            f"if you trust where it came from."
        )
    return kind
