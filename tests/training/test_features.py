"""Training features through the on-disk cache equal encoding in memory; flip stays available."""

import pytest
import torch

from stablediff.config import load_config
from stablediff.data.digits import load_digits
from stablediff.data.features import FeatureCache
from stablediff.data.validate import content_hash
from stablediff.models.build import build_vae
from stablediff.models.text_encoder import load_text_encoder
from stablediff.training.features import encode_dataset, encode_dataset_cached
from stablediff.training.unet_stage import draw_batch
from stablediff.training.vae_stage import images_to_tensor


@pytest.fixture(scope="module")
def parts():
    config = load_config("tiny")
    torch.manual_seed(0)
    vae = build_vae(config.vae, 16).eval()
    train, _ = load_digits(16)
    images = images_to_tensor(train.images[:24])
    captions = [train.captions_for(i) for i in range(24)]
    keys = [content_hash(image.tobytes()) for image in train.images[:24]]
    return vae, images, captions, keys, load_text_encoder("minilm", max_length=8)


def test_cached_features_equal_in_memory_encoding(parts, tmp_path):
    vae, images, captions, keys, text_encoder = parts
    direct = encode_dataset(vae, images, captions, text_encoder, batch_size=256)
    cached, counts = encode_dataset_cached(vae, images, captions, text_encoder, keys, FeatureCache(tmp_path), "t")
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
    vae, images, captions, keys, text_encoder = parts
    encode_dataset_cached(vae, images, captions, text_encoder, keys, FeatureCache(tmp_path), "t")
    _, counts = encode_dataset_cached(vae, images, captions, text_encoder, keys, FeatureCache(tmp_path), "t")
    assert counts.latents_encoded == 0 and counts.text_encoded == 0


def test_flip_draws_mirrored_latents_from_the_cache(parts, tmp_path):
    vae, images, captions, keys, text_encoder = parts
    data, _ = encode_dataset_cached(vae, images, captions, text_encoder, keys, FeatureCache(tmp_path), "t", flip=True)
    with torch.no_grad():
        mirrored = vae.encode(images[:4].flip(-1)).latent_dist.mean
    assert torch.allclose(data.flip_mean[:4], mirrored, atol=1e-5)
    always, _ = draw_batch(data, torch.arange(4), 1.0, 0.0, 0, 0, 0, flip_probability=1.0)
    never, _ = draw_batch(data, torch.arange(4), 1.0, 0.0, 0, 0, 0, flip_probability=0.0)
    assert not torch.allclose(always, never)
