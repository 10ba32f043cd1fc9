"""Refuse model folders whose weights are pickle files, unless the user trusts them.

diffusers and transformers still load `.bin`/`.ckpt` weights with pickle, which
can run code hidden in the file. Folders with safetensors weights load as usual.
"""

from __future__ import annotations

from pathlib import Path

from stablediff.io.pickle_guard import PICKLE_SUFFIXES, refuse_pickle


def check_model_folder(folder: Path, trust_pickle: bool) -> None:
    """Raise PickleRefusedError (exit 1, naming the file and --trust-pickle) for pickle weights."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
            refuse_pickle(path, trust_pickle)
