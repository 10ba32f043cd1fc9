"""DreamBooth's prior preservation: per-sample loss weights, the instance + class set, the prior config."""

import numpy as np
import pytest
import torch
from PIL import Image

from stablediff.config import load_config
from stablediff.config.schema import TrainConfig
from stablediff.errors import ConfigError
from stablediff.finetune.dreambooth import PriorSamples, add_class_images, with_prior_weights
from stablediff.models.diffusion import make_noise_scheduler
from stablediff.training.batches import batch_weights
from stablediff.training.encoded_dataset import EncodedDataset
from stablediff.training.objectives import diffusion_loss
from stablediff.training.precision import Precision
from stablediff.training.run import load_training_images
from stablediff.training.step import StepBatch, accumulate_gradients

from tests.tiny_models import fixed_batch, tiny_unet

CPU = Precision.create("no", torch.device("cpu"))


def step_batch(weights=None) -> StepBatch:
    latents, text, noise, timesteps = fixed_batch()
    return StepBatch(latents, text, noise, timesteps, weights)


def gradient(batch: StepBatch, accumulation: int = 1) -> tuple[float, torch.Tensor]:
    unet = tiny_unet()
    loss = accumulate_gradients(unet, make_noise_scheduler(), batch,
                                TrainConfig(gradient_accumulation_steps=accumulation), CPU)
    return loss, torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])


def test_class_samples_with_loss_weight_zero_give_zero_loss_and_gradient():
    loss, grads = gradient(step_batch(torch.zeros(4)))
    assert loss == 0.0
    assert torch.count_nonzero(grads) == 0


def test_a_loss_weight_scales_the_loss_and_gradient_exactly():
    plain_loss, plain_grads = gradient(step_batch())
    half_loss, half_grads = gradient(step_batch(torch.full((4,), 0.5)))  # a power of two: exact in floats
    assert half_loss == 0.5 * plain_loss
    assert torch.equal(half_grads, 0.5 * plain_grads)


def test_no_weights_compute_exactly_what_all_ones_do():
    latents, text, noise, timesteps = fixed_batch()
    unet, scheduler = tiny_unet(), make_noise_scheduler()
    plain = diffusion_loss(unet, scheduler, latents, text, noise, timesteps, "epsilon")
    ones = diffusion_loss(unet, scheduler, latents, text, noise, timesteps, "epsilon", sample_weights=torch.ones(4))
    assert torch.equal(plain, ones)


def test_each_sample_is_weighted_before_the_batch_mean():
    latents, text, noise, timesteps = fixed_batch()
    unet, scheduler = tiny_unet(), make_noise_scheduler()
    singles = torch.stack([diffusion_loss(unet, scheduler, latents[i:i + 1], text[i:i + 1], noise[i:i + 1],
                                          timesteps[i:i + 1], "epsilon") for i in range(4)])
    weights = torch.tensor([1.0, 0.25, 1.0, 3.0])
    weighted = diffusion_loss(unet, scheduler, latents, text, noise, timesteps, "epsilon", sample_weights=weights)
    torch.testing.assert_close(weighted, (singles * weights).mean(), rtol=1e-5, atol=1e-7)


def test_micro_batches_carry_their_samples_weights():
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5])
    assert [part.weights.tolist() for part in step_batch(weights).split(2)] == [[1.0, 0.0], [2.0, 0.5]]
    assert all(part.weights is None for part in step_batch().split(2))
    whole_loss, whole = gradient(step_batch(weights))
    split_loss, split = gradient(step_batch(weights), accumulation=2)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-6)


def encoded(n: int) -> EncodedDataset:
    return EncodedDataset.single(torch.randn(n, 4, 2, 2), torch.ones(n, 4, 2, 2), torch.zeros(3, 2, 8),
                                 [[1]] * 2 + [[2]] * (n - 2))


def test_instance_samples_repeat_to_balance_the_class_samples_which_carry_the_loss_weight():
    data = with_prior_weights(encoded(8), PriorSamples(num_instance=2, num_class=6, loss_weight=0.3))
    assert len(data) == 2 * 3 + 6
    assert data.row_of.tolist() == [0, 1, 0, 1, 0, 1, 2, 3, 4, 5, 6, 7]
    assert data.caption_ids == [[1]] * 6 + [[2]] * 6
    assert batch_weights(data, torch.tensor([0, 6, 11])).tolist() == pytest.approx([1.0, 0.3, 0.3])
    assert batch_weights(encoded(8), torch.tensor([0, 1])) is None
    assert with_prior_weights(encoded(8), None).weights is None


def write_class_folder(folder, count: int):
    folder.mkdir()
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"dog{i}.png")  # no caption files: the class prompt captions them


def test_class_data_images_follow_the_instance_images_captioned_with_the_class_prompt(tmp_path):
    write_class_folder(tmp_path / "dogs", 3)
    config = load_config("tiny", ["finetune.base=unused", "finetune.instance_prompt=a photo of sks dog",
                                  "finetune.prior.class_prompt=a photo of a dog",
                                  f"finetune.prior.class_data={tmp_path / 'dogs'}", "data.limit=5"])
    instance = load_training_images(config, tmp_path)
    merged, samples = add_class_images(config, tmp_path, instance, None, say=lambda _line: None)
    assert samples == PriorSamples(5, 3, 1.0)
    assert len(merged.images) == len(merged.prepared) == 8
    assert merged.captions[5:] == [["a photo of a dog"]] * 3
    assert merged.prepared.keys[:5] == instance.keys
    assert torch.equal(merged.held_out, instance.held_out)


def prior_config(*overrides: str):
    return load_config("tiny", ["finetune.base=unused", "finetune.prior.class_prompt=a dog", *overrides])


def test_the_prior_needs_exactly_one_source_of_class_images(tmp_path):
    with pytest.raises(ConfigError, match="exactly one source of class images"):
        prior_config()
    with pytest.raises(ConfigError, match="exactly one source of class images"):
        prior_config("finetune.prior.num_class_images=4", f"finetune.prior.class_data={tmp_path}")
    assert prior_config("finetune.prior.num_class_images=4").finetune.prior.loss_weight == 1.0


def test_the_prior_section_needs_a_class_prompt_and_sane_numbers():
    with pytest.raises(ConfigError, match="class_prompt"):
        load_config("tiny", ["finetune.base=unused", "finetune.prior.num_class_images=4"])
    with pytest.raises(ConfigError, match="loss_weight"):
        prior_config("finetune.prior.num_class_images=4", "finetune.prior.loss_weight=-1")
    with pytest.raises(ConfigError, match="num_class_images"):
        prior_config("finetune.prior.num_class_images=0")


def test_textual_inversion_refuses_a_prior():
    with pytest.raises(ConfigError, match="prior preservation.*full or lora"):
        prior_config("finetune.prior.num_class_images=4", "finetune.method=textual_inversion",
                     "finetune.token=<tok>", "finetune.init_token=dog")
