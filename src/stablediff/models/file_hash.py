"""Model file hashes as model sites and UIs show them (streamed: files are gigabytes)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from stablediff.errors import MissingPathError


def file_hashes(path: Path, block: int = 1 << 20) -> dict[str, str]:
    """SHA-256 of the whole file, Civitai's AutoV2 (its first 10 hex digits) and A1111's legacy
    model hash (SHA-256 of the 64 KiB at offset 1 MiB, 8 digits; older UIs still show it)."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"{path} is not a file; `ckpt hash` hashes one model file")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    full = digest.hexdigest()
    return {"sha256": full, "autov2": full[:10], "legacy": legacy}
