"""Samplers by name: each is its diffusers scheduler on the model's own noise schedule."""

import numpy as np
import pytest

from stablediff.inference.schedulers import SAMPLERS, make_scheduler, sampler_from_infotext

from tests.inference.conftest import pixels


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_makes_a_finite_image(loaded, name):
    images = loaded.txt2img("a handwritten digit one", steps=2, sampler=name, seed=3)
    assert SAMPLERS[name].class_name in {cls.__name__ for cls in type(loaded.pipe.scheduler).__mro__}
    assert images[0].size == (16, 16)
    assert np.isfinite(np.asarray(images[0], dtype=np.float32)).all() and pixels(images[0]).std() > 0


def test_samplers_keep_the_models_noise_schedule(loaded):
    model_config = loaded.pipe.scheduler.config
    for name in SAMPLERS:
        config = make_scheduler(name, model_config).config
        assert (config.beta_schedule, config.beta_start, config.beta_end) == ("linear", 0.0001, 0.02), name
        assert config.prediction_type == "epsilon", name


def test_karras_flag_is_set_by_the_name_not_left_over_from_a_saved_config(loaded):
    karras = make_scheduler("dpmpp_2m_karras", loaded.pipe.scheduler.config)
    assert karras.config.use_karras_sigmas is True
    plain = make_scheduler("dpmpp_2m", karras.config)
    assert plain.config.use_karras_sigmas is False and plain.config.algorithm_type == "dpmsolver++"


def test_an_unknown_sampler_is_refused_listing_the_valid_names():
    with pytest.raises(ValueError, match="unknown sampler 'dpm\\+\\+'.*ddpm.*euler_a.*dpmpp_2m.*unipc"):
        make_scheduler("dpm++", {})


def test_a1111_sampler_names_map_to_ours():
    assert sampler_from_infotext("DPM++ 2M Karras") == "dpmpp_2m_karras"
    assert sampler_from_infotext("DPM++ 2M", "Karras") == "dpmpp_2m_karras"
    assert sampler_from_infotext("Euler a") == "euler_a"
    assert sampler_from_infotext("unipc") == "unipc"


SD_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "steps_offset": 1, "timestep_spacing": "leading"}


@pytest.mark.parametrize("steps", [1000, 999, 501])
def test_as_many_sampling_steps_as_training_timesteps_stay_inside_the_schedule(steps):
    scheduler = make_scheduler("ddpm", SD_CONFIG, steps)
    scheduler.set_timesteps(steps)
    assert int(scheduler.timesteps.max()) <= 999 and len(scheduler.timesteps) == steps


def test_the_steps_offset_is_kept_where_it_fits():
    scheduler = make_scheduler("ddim", SD_CONFIG, 20)
    scheduler.set_timesteps(20)
    assert scheduler.config.steps_offset == 1 and int(scheduler.timesteps.max()) == 951


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_makes_image_i_of_a_batch_of_4_alone_from_seed_plus_i(loaded, name):
    import torch

    torch.manual_seed(123)  # the global RNG's state must not matter
    batch = loaded.txt2img("a handwritten digit one", steps=3, sampler=name, seed=50, num=4)
    torch.manual_seed(456)
    alone = loaded.txt2img("a handwritten digit one", steps=3, sampler=name, seed=52)[0]
    again = loaded.txt2img("a handwritten digit one", steps=3, sampler=name, seed=52)[0]
    assert np.array_equal(pixels(alone), pixels(again))
    assert np.abs(pixels(batch[2]) - pixels(alone)).max() <= 1  # batched matmuls may round differently
