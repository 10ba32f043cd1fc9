"""Fill the feature cache: encode only what is not cached yet, in fixed batches, resumably.

`encode_all` is what `stablediff data cache` and the start of training run; the
stores it fills are in `feature_cache.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence, Sized
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from stablediff.data.feature_cache import FeatureCache, LatentStore, TextStore
from stablediff.data.ingest import chunks


@dataclass
class EncodeCounts:
    """What `encode_all` did: distinct samples and captions encoded now vs found in the cache."""

    latents_encoded: int = 0
    latents_reused: int = 0
    text_encoded: int = 0
    text_reused: int = 0


Sample = tuple[str, torch.Tensor, Sequence[str]]  # (content hash, image (3, H, W) in [-1, 1], captions)


def encode_all(cache: FeatureCache, vae: torch.nn.Module, text_encoder, samples: Iterable[Sample],
               transform_id: str, *, flip: bool = False, batch_size: int = 64,
               progress: Callable[[int, int | None], None] | None = None,
               fingerprint: str | None = None, latents: LatentStore | None = None) -> EncodeCounts:
    """Fill both namespaces for `samples`, encoding only what is not cached; resumable after a crash.

    Batches are fixed blocks of `samples` in order; a block with any uncached sample goes
    through the VAE whole and only its missing rows are stored (see `LatentStore.add`), so a
    fill that was killed and run again leaves a cache bitwise equal to an uninterrupted one.
    `text_encoder=None` fills only the latents. `progress(done, total)` is called after each
    batch (`total` is None for an unsized iterable). `fingerprint` is the VAE's, when the
    caller has it already (hashing a large VAE's weights takes a while). `latents`: the
    namespace's store, when the caller holds it open to read the rows back (its shards are
    then verified and decoded once).
    """
    counts = EncodeCounts()
    total = len(samples) if isinstance(samples, Sized) else None
    seen_keys: set[str] = set()
    seen_captions: set[str] = set()
    done = 0
    with ExitStack() as stack:
        if latents is None:
            latents = stack.enter_context(cache.latents(vae, transform_id, fingerprint))
        text = stack.enter_context(cache.text(text_encoder)) if text_encoder is not None else None
        for batch in chunks(samples, batch_size):
            _fill_latents(latents, batch, flip, seen_keys, counts)
            if text is not None:
                _fill_text(text, batch, seen_captions, counts)
            done += len(batch)
            if progress is not None:
                progress(done, total)
    return counts


def _fill_latents(store: LatentStore, batch: list[Sample], flip: bool, seen: set[str],
                  counts: EncodeCounts) -> None:
    fresh = {key: image for key, image, _ in batch if key not in seen}
    seen.update(fresh)
    todo = store.missing(fresh, flip=flip)
    if todo:
        store.add(list(fresh), torch.stack(list(fresh.values())), flip=flip, only=todo)
    counts.latents_encoded += len(todo)
    counts.latents_reused += len(fresh) - len(todo)


def _fill_text(store: TextStore, batch: list[Sample], seen: set[str], counts: EncodeCounts) -> None:
    fresh = list(dict.fromkeys(c for _, _, captions in batch for c in captions if c not in seen))
    seen.update(fresh)
    todo = store.missing(fresh)
    store.add(todo)
    counts.text_encoded += len(todo)
    counts.text_reused += len(fresh) - len(todo)

