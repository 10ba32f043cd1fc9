"""The feature cache: exact round trips, reuse, per-encoder invalidation, crash safety, damage repair."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from stablediff.data.feature_cache import FeatureCache, caption_key, vae_fingerprint
from stablediff.data.feature_shards import FeatureCacheError, FeatureCacheWarning, shard_name
from stablediff.data.cache_fill import encode_all
from stablediff.models.text_encoder import load_text_encoder

from ._cache_writer_proc import SHARD_SIZE, TRANSFORM_ID, fill, sample_images, tiny_vae

WRITER = Path(__file__).with_name("_cache_writer_proc.py")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: a second OpenMP thread only adds sync cost (10x when the CPUs are busy)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder("minilm", max_length=8)


@dataclasses.dataclass
class CountingEncoder:
    """A real text encoder that counts the captions it is asked to encode."""

    inner: object
    calls: int = 0

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    def encode(self, captions: list[str]) -> torch.Tensor:
        self.calls += len(captions)
        return self.inner.encode(captions)


@torch.no_grad()
def direct(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    posterior = vae.encode(images).latent_dist
    return posterior.mean, posterior.std


def samples(keys: list[str], images: torch.Tensor) -> list[tuple]:
    return [(key, image, [f"digit {i % 5}", f"the number {i % 5}"]) for i, (key, image) in enumerate(zip(keys, images))]


def latents_dir(cache: FeatureCache, vae) -> Path:
    return cache.latents(vae, TRANSFORM_ID).directory


def test_cached_posteriors_equal_direct_encoding_bitwise(tmp_path, vae):
    keys, images = sample_images(6)
    with FeatureCache(tmp_path).latents(vae, TRANSFORM_ID) as store:
        store.add(keys, images, flip=True)
    store = FeatureCache(tmp_path).latents(vae, TRANSFORM_ID)  # read back from disk, not the buffer
    mean, std = direct(vae, images)
    flip_mean, flip_std = direct(vae, images.flip(-1))
    assert all(torch.equal(a, b) for a, b in zip(store.get(keys), (mean, std)))
    assert all(torch.equal(a, b) for a, b in zip(store.get(keys, flipped=True), (flip_mean, flip_std)))
    mask = torch.tensor([True, False, True, False, False, True])
    mixed_mean, _ = store.get(keys, flipped=mask)
    assert torch.equal(mixed_mean[mask], flip_mean[mask]) and torch.equal(mixed_mean[~mask], mean[~mask])


def test_entries_span_shards_and_come_back_in_request_order(tmp_path, vae):
    keys, images = sample_images(10)
    with FeatureCache(tmp_path, shard_size=4).latents(vae, TRANSFORM_ID) as store:
        store.add(keys, images)
    directory = store.directory
    assert sorted(p.name for p in directory.glob("shard-*")) == [shard_name(i) for i in range(3)]
    index = json.loads((directory / "index.json").read_text())
    assert index["entries"][keys[9]] == [2, 1]
    order = [7, 0, 9, 3]
    mean, _ = FeatureCache(tmp_path, shard_size=4).latents(vae, TRANSFORM_ID).get([keys[i] for i in order])
    assert torch.equal(mean, direct(vae, images)[0][order])


def test_caption_embeddings_round_trip(tmp_path, text_encoder):
    captions = ["a handwritten seven", "", "the number 7"]
    with FeatureCache(tmp_path).text(text_encoder) as store:
        store.add(captions)
    store = FeatureCache(tmp_path).text(text_encoder)
    assert store.missing(captions + ["new caption"]) == ["new caption"]
    assert torch.equal(store.get(captions[::-1]), text_encoder.encode(captions[::-1]))
    assert (store.directory / "index.json").read_text().count(caption_key("")) == 1


def test_second_run_reuses_everything_and_new_samples_encode_alone(tmp_path, vae, text_encoder):
    keys, images = sample_images(12)
    cache, counting = FeatureCache(tmp_path, shard_size=5), CountingEncoder(text_encoder)
    first = encode_all(cache, vae, counting, samples(keys[:8], images[:8]), TRANSFORM_ID, batch_size=3)
    assert (first.latents_encoded, first.latents_reused, first.text_encoded) == (8, 0, 10)
    counting.calls = 0
    progress = []
    again = encode_all(cache, vae, counting, samples(keys[:8], images[:8]), TRANSFORM_ID, batch_size=3,
                       progress=lambda done, total: progress.append((done, total)))
    assert (again.latents_encoded, again.latents_reused, again.text_encoded, counting.calls) == (0, 8, 0, 0)
    assert progress == [(3, 8), (6, 8), (8, 8)]
    grown = encode_all(cache, vae, counting, samples(keys, images), TRANSFORM_ID, batch_size=3)
    assert (grown.latents_encoded, grown.latents_reused) == (4, 8)
    assert cache.latents(vae, TRANSFORM_ID).missing(keys) == []


def test_changed_vae_gets_new_latents_and_reuses_text(tmp_path, vae, text_encoder):
    keys, images = sample_images(4)
    cache, counting = FeatureCache(tmp_path), CountingEncoder(text_encoder)
    encode_all(cache, vae, counting, samples(keys, images), TRANSFORM_ID)
    changed = tiny_vae()
    with torch.no_grad():
        changed.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    assert vae_fingerprint(changed) != vae_fingerprint(vae)
    counting.calls = 0
    counts = encode_all(cache, changed, counting, samples(keys, images), TRANSFORM_ID)
    assert (counts.latents_encoded, counts.text_encoded, counts.text_reused, counting.calls) == (4, 0, 8, 0)
    assert len(list((tmp_path / "latents").iterdir())) == 2
    assert torch.equal(cache.latents(changed, TRANSFORM_ID).get(keys)[0], direct(changed, images)[0])


def test_changed_text_encoder_gets_new_text_and_reuses_latents(tmp_path, vae, text_encoder):
    keys, images = sample_images(4)
    cache = FeatureCache(tmp_path)
    encode_all(cache, vae, text_encoder, samples(keys, images), TRANSFORM_ID)
    other = CountingEncoder(dataclasses.replace(text_encoder, fingerprint="other-encoder"))
    counts = encode_all(cache, vae, other, samples(keys, images), TRANSFORM_ID)
    assert (counts.latents_encoded, counts.latents_reused, counts.text_encoded, other.calls) == (0, 4, 8, 8)
    assert sorted(p.name for p in (tmp_path / "text").iterdir()) == sorted([text_encoder.fingerprint,
                                                                             "other-encoder"])


def test_fingerprint_ignores_scaling_factor_and_transform_is_its_own_namespace(tmp_path, vae):
    rescaled = tiny_vae()
    rescaled.register_to_config(scaling_factor=0.5)  # set after VAE training; the cache stores unscaled latents
    assert vae_fingerprint(rescaled) == vae_fingerprint(vae)
    keys, images = sample_images(2)
    cache = FeatureCache(tmp_path)
    with cache.latents(vae, TRANSFORM_ID) as store:
        store.add(keys, images)
    assert cache.latents(vae, "center-crop-512").missing(keys) == keys


def test_flip_request_needs_mirrored_entries(tmp_path, vae):
    keys, images = sample_images(3)
    with FeatureCache(tmp_path).latents(vae, TRANSFORM_ID) as store:
        store.add(keys, images, flip=False)
        assert store.missing(keys) == [] and store.missing(keys, flip=True) == keys
        with pytest.raises(FeatureCacheError, match="flip=True"):
            store.get(keys, flipped=True)
        with pytest.raises(FeatureCacheError, match="call missing\\(\\) and add\\(\\)"):
            store.get(["not-cached"])
        with pytest.raises(ValueError, match="\\[-1, 1\\]"):
            store.add(["k"], images[:1] * 127.5 + 127.5)


def test_killed_fill_resumes_to_the_same_cache_as_an_uninterrupted_one(tmp_path, vae):
    num, killed_root = 600, tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, str(WRITER), str(killed_root), str(num)], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        for line in proc.stdout:
            if int(line.split()[1]) >= 10 * SHARD_SIZE:
                break  # well into the run: shards and the index are being rewritten as we kill
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the writer exited by itself ({proc.returncode}); see its stderr"
    keys, _ = sample_images(num)
    cache = FeatureCache(killed_root, shard_size=SHARD_SIZE)
    directory = latents_dir(cache, vae)
    (directory / "shard-09999.safetensors.tmp-1-torn").write_bytes(b"\x00" * 17)  # a torn temp, as a crash leaves
    with warnings.catch_warnings():
        warnings.simplefilter("error", FeatureCacheWarning)  # every shard the index names must verify
        committed = len(cache.latents(vae, TRANSFORM_ID))
        resumed = fill(str(killed_root), num)
    assert 10 * SHARD_SIZE - SHARD_SIZE <= committed < num
    assert (resumed.latents_encoded, resumed.latents_reused) == (num - committed, committed)
    fill(str(tmp_path / "uninterrupted"), num)
    reference = FeatureCache(tmp_path / "uninterrupted").latents(vae, TRANSFORM_ID)
    store = FeatureCache(killed_root).latents(vae, TRANSFORM_ID)
    for flipped in (False, True):
        assert all(torch.equal(a, b) for a, b in zip(store.get(keys, flipped), reference.get(keys, flipped)))
    assert not [p for p in directory.iterdir() if ".tmp-" in p.name]


def write_three_shards(tmp_path: Path, vae) -> tuple[FeatureCache, list[str], torch.Tensor, Path]:
    keys, images = sample_images(12)
    cache = FeatureCache(tmp_path, shard_size=4)
    with cache.latents(vae, TRANSFORM_ID) as store:
        store.add(keys, images)
    return cache, keys, images, store.directory / shard_name(1)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # inside the tensor data: safetensors itself would not notice
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated", "deleted"])
def test_damaged_shard_is_reported_and_its_samples_encoded_again(tmp_path, vae, damage):
    cache, keys, images, shard = write_three_shards(tmp_path, vae)
    if damage == "flipped_byte":
        flip_a_byte(shard)
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        shard.unlink()
    store = cache.latents(vae, TRANSFORM_ID)
    with pytest.warns(FeatureCacheWarning, match=shard.name):
        assert store.missing(keys) == keys[4:8]
    with store:
        store.add(keys[4:8], images[4:8])
    mean, _ = cache.latents(vae, TRANSFORM_ID).get(keys)
    assert torch.equal(mean[4:8], direct(vae, images[4:8])[0])
    assert torch.equal(mean[:4], direct(vae, images)[0][:4])


def test_damage_found_by_get_is_an_error_that_says_how_to_recover(tmp_path, vae):
    cache, keys, _, shard = write_three_shards(tmp_path, vae)
    flip_a_byte(shard)
    store = cache.latents(vae, TRANSFORM_ID)
    with pytest.warns(FeatureCacheWarning), pytest.raises(FeatureCacheError, match="damaged.*add\\(\\) again"):
        store.get(keys)
    assert store.missing(keys) == keys[4:8]


def test_unreadable_index_means_encoding_again_not_a_crash(tmp_path, vae):
    cache, keys, _, shard = write_three_shards(tmp_path, vae)
    (shard.parent / "index.json").write_text('{"format": 1, "ident')
    with pytest.warns(FeatureCacheWarning, match="unreadable"):
        assert cache.latents(vae, TRANSFORM_ID).missing(keys) == keys
