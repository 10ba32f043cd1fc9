"""The on-disk feature cache: VAE posteriors and caption embeddings, encoded once, reused by every run.

Layout under the cache root (two namespaces, each invalidated only by its own encoder):

    latents/<vae fingerprint>/transform-<hash of transform_id>/   index.json, shard-00000.safetensors, ...
    text/<text encoder fingerprint>/                               index.json, shard-00000.safetensors, ...

A latents shard holds, per sample, the posterior `mean` and `std` (float32,
(C, h, w), unscaled: `scaling_factor` is applied by the trainer) and, for
samples added with `flip=True`, `flip_mean`/`flip_std` of the horizontally
mirrored image, so flip augmentation still works from the cache. A text shard
holds `embedding` (L, D) per distinct caption, keyed by the caption's BLAKE3.

`index.json` maps each key to `[shard, row]` and records each shard's size and
BLAKE3. It is the commit point, as in the checkpoint store: a shard is written
to a temporary name, fsynced and renamed, and only then is the index rewritten
the same way. A crash leaves an index that names only complete shards, so a
second run encodes just what the index lacks. Shards are verified against the
index when first read; a damaged one is reported, dropped, and its samples come
back from `missing()` to be encoded again.

One process writes a namespace at a time (an exclusive `flock` on
`.lock` serialises writers, e.g. ranks encoding in parallel); readers need no lock.
The index is rewritten per shard, which is fine to ~10^5-10^6 keys per namespace.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

import blake3
import torch

from stablediff.data.feature_shards import DEFAULT_MAX_CACHED_BYTES, DEFAULT_SHARD_SIZE, ShardedStore

LATENT_TENSORS = frozenset({"mean", "std"})
FLIP_TENSORS = frozenset({"flip_mean", "flip_std"})
TEXT_TENSORS = frozenset({"embedding"})
# The cache holds unscaled posteriors, so the scaling a trained VAE is given afterwards
# (and diffusers' bookkeeping keys, `_name_or_path` etc.) must not change the fingerprint.
FINGERPRINT_IGNORED_CONFIG = frozenset({"scaling_factor", "shift_factor"})
_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """BLAKE3 of the VAE's config and weights (tensors in name order): names its latents namespace."""
    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    config = {key: value for key, value in dict(vae.config).items()
              if not key.startswith("_") and key not in FINGERPRINT_IGNORED_CONFIG}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"\n{name}:{flat.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()[:32]


def caption_key(caption: str) -> str:
    """BLAKE3 of the caption's UTF-8 bytes: its key in the text namespace."""
    return blake3.blake3(caption.encode("utf-8", "surrogatepass")).hexdigest()



def _path_component(text: str) -> str:
    """`text` itself when it is a tame directory name, else a hash of it."""
    return text if _SAFE_COMPONENT.fullmatch(text) else "h-" + blake3.blake3(text.encode()).hexdigest()[:24]




class LatentStore(ShardedStore):
    """VAE posteriors (mean, std) per sample key, optionally also of the mirrored image."""

    def __init__(self, vae: torch.nn.Module, directory: Path, identity: dict[str, str], shard_size: int,
                 max_cached_bytes: int):
        super().__init__(directory, identity, shard_size, max_cached_bytes)
        self.vae = vae

    def missing(self, keys: Iterable[str], flip: bool = False) -> list[str]:
        """Keys (unique, in order) to encode; with `flip`, also those cached without their mirror."""
        return self._missing(keys, LATENT_TENSORS | FLIP_TENSORS if flip else LATENT_TENSORS)

    def add(self, keys: Sequence[str], images: torch.Tensor, flip: bool = False,
            only: Collection[str] | None = None) -> None:
        """Encode images (B, 3, H, W) in [-1, 1] (and their mirrors, with `flip`) and buffer the rows.

        With `only`, the whole batch is still encoded but just those keys' rows are kept: CPU
        kernels round differently by batch size, so a row then does not depend on which of
        its batch-mates happened to be cached already.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB in [-1, 1]; got shape {tuple(images.shape)}")
        if len(keys) != len(images):
            raise ValueError(f"{len(keys)} keys for {len(images)} images")
        if images.numel() and (images.min() < -1.001 or images.max() > 1.001):
            raise ValueError(f"images range over [{images.min():.3g}, {images.max():.3g}]; the VAE expects "
                             "[-1, 1] (x / 127.5 - 1 for 8-bit pixels)")
        wanted = set(keys if only is None else only)
        rows = [i for i, key in enumerate(keys) if key in wanted]
        if not rows:
            return
        tensors = dict(zip(("mean", "std"), self._encode(images)))
        if flip:
            tensors.update(zip(("flip_mean", "flip_std"), self._encode(images.flip(-1))))
        if len(rows) < len(keys):
            tensors = {name: rows_of[rows] for name, rows_of in tensors.items()}
        self._append([keys[i] for i in rows], tensors)

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        param = next(self.vae.parameters())
        posterior = self.vae.encode(images.to(param.device, param.dtype)).latent_dist
        return posterior.mean.float().cpu(), posterior.std.float().cpu()

    def get(self, keys: Sequence[str], flipped: bool | torch.Tensor = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (N, C, h, w) float32; `flipped` (a bool or (N,) bools) picks the mirrored rows."""
        if isinstance(flipped, bool):
            if not flipped:
                rows = self._gather(keys, LATENT_TENSORS)
                return rows["mean"], rows["std"]
            rows = self._gather(keys, FLIP_TENSORS)
            return rows["flip_mean"], rows["flip_std"]
        mask = torch.as_tensor(flipped, dtype=torch.bool).reshape(-1)
        if len(mask) != len(keys):
            raise ValueError(f"flipped has {len(mask)} entries for {len(keys)} keys")
        if not mask.any():
            return self.get(keys, False)
        rows = self._gather(keys, LATENT_TENSORS | FLIP_TENSORS)
        where = mask.view(-1, *([1] * (rows["mean"].ndim - 1)))
        return torch.where(where, rows["flip_mean"], rows["mean"]), torch.where(where, rows["flip_std"], rows["std"])


class TextStore(ShardedStore):
    """Caption embeddings (L, D), keyed by the BLAKE3 of the caption."""

    def __init__(self, text_encoder, directory: Path, identity: dict[str, str], shard_size: int,
                 max_cached_bytes: int):
        super().__init__(directory, identity, shard_size, max_cached_bytes)
        self.text_encoder = text_encoder

    def missing(self, captions: Iterable[str]) -> list[str]:
        """Captions (unique, in order) not cached yet."""
        captions = list(dict.fromkeys(captions))
        absent = set(self._missing([caption_key(c) for c in captions], TEXT_TENSORS))
        return [c for c in captions if caption_key(c) in absent]

    def add(self, captions: Iterable[str]) -> None:
        """Encode the distinct captions given and buffer their embeddings."""
        captions = list(dict.fromkeys(captions))
        for start in range(0, len(captions), self.shard_size):
            chunk = captions[start : start + self.shard_size]
            embeddings = self.text_encoder.encode(chunk)  # (n, L, D)
            self._append([caption_key(c) for c in chunk], {"embedding": embeddings})

    def get(self, captions: Sequence[str]) -> torch.Tensor:
        """(N, L, D) float32 embeddings, in the order given."""
        return self._gather([caption_key(c) for c in captions], TEXT_TENSORS)["embedding"]


class FeatureCache:
    """A cache root holding a latents namespace per (VAE, transform) and a text namespace per encoder."""

    def __init__(self, root: str | Path, shard_size: int = DEFAULT_SHARD_SIZE,
                 max_cached_bytes: int = DEFAULT_MAX_CACHED_BYTES):
        self.root = Path(root).expanduser()
        self.shard_size = shard_size
        self.max_cached_bytes = max_cached_bytes

    def latents(self, vae: torch.nn.Module, transform_id: str, fingerprint: str | None = None) -> LatentStore:
        """The store for this VAE (by `vae_fingerprint`, or the one given) and image transform.

        `transform_id` names everything that turns the stored image into the VAE's input
        (resolution, resize, crop), e.g. "cover-center-512x512": a different transform is
        a different namespace.
        """
        if not transform_id:
            raise ValueError("transform_id is empty: name the resize/crop that made the images, e.g. 'center-512'")
        fingerprint = fingerprint or vae_fingerprint(vae)
        transform = "transform-" + blake3.blake3(transform_id.encode()).hexdigest()[:16]
        directory = self.root / "latents" / _path_component(fingerprint) / transform
        identity = {"kind": "latents", "vae": fingerprint, "transform_id": transform_id}
        return LatentStore(vae, directory, identity, self.shard_size, self.max_cached_bytes)

    def text(self, text_encoder) -> TextStore:
        """The store for this text encoder (by its `fingerprint`)."""
        fingerprint = str(text_encoder.fingerprint)
        directory = self.root / "text" / _path_component(fingerprint)
        identity = {"kind": "text", "text_encoder": fingerprint}
        return TextStore(text_encoder, directory, identity, self.shard_size, self.max_cached_bytes)
