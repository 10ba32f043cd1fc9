"""Turn any data source into training tensors: validate, quarantine, transform, split.

Every sample is judged; rejects go to RUN_DIR/quarantine.jsonl with their
reason and the run goes on, unless rejects exceed `data.max_reject_fraction`.
One sample in twenty (chosen by content hash, so stable across runs) is held
out for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stablediff.data.sources import open_source
from stablediff.data.transforms import ImageTransform
from stablediff.data.validate import Quarantine, Validator, check_reject_fraction, filter_valid

HELD_OUT_EVERY = 20


@dataclass
class CaptionedImages:
    images: torch.Tensor  # (N, 3, R, R) in [-1, 1]
    captions: list[list[str]]  # per sample, its caption variants
    held_out: torch.Tensor  # (M, 3, R, R)
    keys: list[str]  # per sample, the BLAKE3 of its file's bytes (the feature cache's key)


def load_captioned_images(spec: str, resolution: int, run_dir: Path, max_reject_fraction: float,
                          caption_policy: str = "error", limit: int | None = None) -> CaptionedImages:
    transform = ImageTransform(size=(resolution, resolution))
    validator = Validator()
    train, captions, held, keys = [], [], [], []
    with Quarantine(run_dir) as quarantine:
        for sample, verdict in filter_valid(open_source(spec, caption_policy), validator, quarantine):
            tensor, _ = transform(validator.last_image)  # decoded once, by the validator
            if int(verdict.content_hash[:8], 16) % HELD_OUT_EVERY == 0:
                held.append(tensor)
                continue
            train.append(tensor)
            captions.append([sample.caption or ""])
            keys.append(verdict.content_hash)
            if limit and len(train) >= limit:
                break
    check_reject_fraction(dict(validator.rejects), validator.total, max_reject_fraction, quarantine.path)
    if not train:
        raise ValueError(f"data.source {spec!r}: no usable training samples")
    held_out = torch.stack(held) if held else torch.stack(train[:1])
    return CaptionedImages(torch.stack(train), captions, held_out, keys)
