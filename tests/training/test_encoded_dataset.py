"""Training features through the on-disk cache equal encoding in memory; flip, buckets and random crops too."""

import pytest
import torch

from stablediff.config import load_config
from stablediff.data.digits import load_digits
from stablediff.data.buckets import resolve_buckets
from stablediff.data.feature_cache import FeatureCache
from stablediff.data.crop_policy import CropPolicy
from stablediff.data.training_set import BucketedCrops, load_captioned_images
from stablediff.data.order import BucketBatchOrder
from stablediff.data.validate import content_hash
from stablediff.models.build import build_vae
from stablediff.models.text_encoder import load_text_encoder
from stablediff.training.batches import draw_batch
from stablediff.training.encoded_dataset import bucket_step, encode_dataset, encode_dataset_cached
from stablediff.data.transforms import pixels_to_tensor

from tests.data.corpus import build_mixed_aspect_folder


@pytest.fixture(scope="module")
def parts():
    config = load_config("tiny")
    torch.manual_seed(0)
    vae = build_vae(config.vae, 16).eval()
    train, _ = load_digits(16)
    images = pixels_to_tensor(train.images[:24])
    captions = [train.captions_for(i) for i in range(24)]
    prepared = BucketedCrops.square(images, [content_hash(image.tobytes()) for image in train.images[:24]])
    return vae, prepared, captions, load_text_encoder("minilm", max_length=8)


def test_cached_features_equal_in_memory_encoding(parts, tmp_path):
    vae, prepared, captions, text_encoder = parts
    direct = encode_dataset(vae, prepared, captions, text_encoder, batch_size=256)
    cached, counts = encode_dataset_cached(vae, prepared, captions, text_encoder, FeatureCache(tmp_path))
    assert counts.latents_encoded == 24
    # Equal up to float rounding: the cache encodes in its own fixed batches.
    assert torch.allclose(direct.latent_mean, cached.latent_mean, atol=1e-6)
    assert torch.allclose(direct.latent_std, cached.latent_std, atol=1e-6)
    assert torch.allclose(direct.embeddings, cached.embeddings, atol=1e-6)
    assert direct.caption_ids == cached.caption_ids
    indices = torch.arange(8)
    for a, b in zip(draw_batch(direct, indices, 0.5, 0.1, 0, 3, 0), draw_batch(cached, indices, 0.5, 0.1, 0, 3, 0)):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_second_run_encodes_nothing(parts, tmp_path):
    vae, prepared, captions, text_encoder = parts
    encode_dataset_cached(vae, prepared, captions, text_encoder, FeatureCache(tmp_path))
    _, counts = encode_dataset_cached(vae, prepared, captions, text_encoder, FeatureCache(tmp_path))
    assert counts.latents_encoded == 0 and counts.text_encoded == 0


def test_flip_draws_mirrored_latents_from_the_cache(parts, tmp_path):
    vae, prepared, captions, text_encoder = parts
    data, _ = encode_dataset_cached(vae, prepared, captions, text_encoder, FeatureCache(tmp_path), flip=True)
    with torch.no_grad():
        mirrored = vae.encode(prepared.stack(0, 0)[1][:4].flip(-1)).latent_dist.mean
    assert torch.allclose(data.flip_mean[:4], mirrored, atol=1e-5)
    always, _ = draw_batch(data, torch.arange(4), 1.0, 0.0, 0, 0, 0, flip_probability=1.0)
    never, _ = draw_batch(data, torch.arange(4), 1.0, 0.0, 0, 0, 0, flip_probability=0.0)
    assert not torch.allclose(always, never)


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory):
    """A mixed-aspect folder loaded into buckets with two random crops per image."""
    root = tmp_path_factory.mktemp("mixed")
    config = load_config("tiny")
    sizes = tuple(resolve_buckets("auto", 32, bucket_step(config.vae)))
    crop_policy = CropPolicy(sizes, crop="random", variants=2, seed=1)
    data = load_captioned_images(build_mixed_aspect_folder(root / "data"), 32, root / "run", 0.0,
                                 crop_policy=crop_policy)
    return data.prepared, data.captions


def test_bucketed_cached_training_matches_encoding_on_the_fly(parts, bucketed, tmp_path):
    vae, _, _, text_encoder = parts
    prepared, captions = bucketed
    direct = encode_dataset(vae, prepared, captions, text_encoder, flip=True, bucketed=True)
    cached, counts = encode_dataset_cached(vae, prepared, captions, text_encoder, FeatureCache(tmp_path), flip=True,
                                           bucketed=True)
    assert counts.latents_encoded == 2 * len(prepared)  # every crop variant of every image, once
    assert len(cached.buckets) == len(set(prepared.bucket_ids)) > 1
    for a, b in zip(direct.buckets, cached.buckets, strict=True):
        width, height = a.size
        assert a.mean.shape[0] == 2 and a.mean.shape[-2:] == (height // 2, width // 2)  # the tiny VAE halves
        assert torch.allclose(a.mean, b.mean, atol=1e-5) and torch.allclose(a.flip_std, b.flip_std, atol=1e-5)
    order = BucketBatchOrder(cached.order_bucket_ids, seed=0)
    for step in range(6):
        indices = torch.from_numpy(order.next_batch(4))
        for x, y in zip(draw_batch(direct, indices, 0.5, 0.1, 0, step, 0, 0.5),
                        draw_batch(cached, indices, 0.5, 0.1, 0, step, 0, 0.5)):
            assert torch.allclose(x, y, atol=1e-5)


def test_each_bucket_and_crop_variant_is_cached_once(parts, bucketed, tmp_path):
    vae, _, _, text_encoder = parts
    prepared, captions = bucketed
    encode_dataset_cached(vae, prepared, captions, text_encoder, FeatureCache(tmp_path))
    _, counts = encode_dataset_cached(vae, prepared, captions, text_encoder, FeatureCache(tmp_path))
    assert counts.latents_encoded == 0 and counts.latents_reused == 2 * len(prepared)
    namespaces = list((tmp_path / "latents").glob("*/transform-*"))
    assert len(namespaces) == 2 * len(set(prepared.bucket_ids))  # (bucket, variant) pairs
