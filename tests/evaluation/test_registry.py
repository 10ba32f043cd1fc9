"""The metric registry: every metric of METRIC_MODES from one lazy context, deterministic, and failing early
with what to provide. On a tiny random-weight SD pipeline (16x16 digits), so a few seconds in all."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stablediff.config import RunConfig
from stablediff.errors import ConfigError, ModelFileError
from stablediff.evaluation.context import EvalContext, EvalSettings
from stablediff.evaluation.registry import MetricResult, available_metrics, check_requirements, evaluate, \
    metric_settings
from stablediff.evaluation.val_loss import validation_loss
from stablediff.inference.pipeline import images_to_array, txt2img
from stablediff.models.build import build_noise_scheduler
from stablediff.run_schema import METRIC_MODES
from tests.models.tiny_sd import tiny_pipeline

DIGITS = RunConfig.model_validate({"data": {"source": "builtin:digits", "resolution": 16}})
SETTINGS = EvalSettings(num_samples=20, sample_steps=2, bpd_timesteps=4)
LOCAL = ["val_loss", "fd", "kid", "adherence", "bpd"]  # clip needs a CLIP folder: tests/evaluation/test_clip_score.py


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def context(pipe):
    return EvalContext(pipe, DIGITS, SETTINGS)


@pytest.fixture(scope="module")
def results(context):
    return evaluate(context, LOCAL)


def test_every_metric_of_metric_modes_has_a_computation():
    assert available_metrics(DIGITS, EvalSettings(clip="some/folder")) == list(METRIC_MODES)


def test_each_result_carries_value_spread_count_time_settings_and_details(results):
    assert list(results) == LOCAL
    for name, result in results.items():
        assert np.isfinite(result.value) and result.seconds >= 0, name
        entry = result.to_json()
        assert {"value", "spread", "count", "seconds", "settings"} <= entry.keys()
        assert MetricResult.from_json(name, entry) == result
    assert results["fd"].count == results["kid"].count == results["adherence"].count == 20
    assert results["fd"].details["feature_dim"] == 64 and results["fd"].details["reference_count"] > 300
    assert "fewer samples than dimensions" in results["fd"].details["warning"]  # 20 < 64: said, not hidden
    assert results["kid"].spread > 0 and results["bpd"].spread > 0 and results["fd"].spread is None
    assert results["bpd"].details["unit"] == "bits per latent dimension"
    assert results["val_loss"].count == 64 and set(results["val_loss"].details["per_timestep"]) == \
        {"100", "300", "500", "700", "900"}


def test_adherence_details_hold_per_class_scores_macro_accuracy_and_the_confusion_matrix(results):
    details = results["adherence"].details
    assert details["accuracy"] == results["adherence"].value
    assert set(details["per_class"]) == {str(d) for d in range(10)}
    assert {"precision", "recall", "f1"} <= details["macro"].keys() and {"precision", "recall", "f1"} <= \
        details["per_class"]["3"].keys()
    confusion = np.array(details["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 20 and (confusion.sum(axis=1) == 2).all()
    assert details["reference"]["value"] > 0.8  # the classifier on the real held-out digits


def test_the_metrics_share_one_set_of_images_made_from_the_digit_prompts_and_fixed_seeds(pipe, context, results):
    generated = context.generated()
    assert len(generated.images) == 20 and list(generated.digits) == [d for d in range(10) for _ in range(2)]
    three = images_to_array(txt2img(pipe, "a handwritten digit three", steps=2, seed=1000, num=2))
    assert np.array_equal(generated.images[6:8], three)
    assert context.generated() is generated


def nines_fine_tune(method: str, **finetune) -> RunConfig:
    return RunConfig.model_validate({"data": {"source": "builtin:digits?digits=9&count=20", "resolution": 16},
                                     "finetune": {"base": "/models/base", "method": method, **finetune}})


def test_a_one_digit_fine_tune_is_prompted_and_validated_with_its_instance_prompt(pipe):
    # A textual inversion learned "<nine>", not "nine": its adherence and val_loss must ask for the token.
    config = nines_fine_tune("textual_inversion", token="<nine>", init_token="eight",
                             instance_prompt="a handwritten digit <nine>")
    context = EvalContext(pipe, config, EvalSettings(num_samples=2, sample_steps=2))
    generated = context.generated()
    assert generated.prompts == ["a handwritten digit <nine>"] * 2 and list(generated.digits) == [9, 9]
    held_out = context.held_out()
    assert len(held_out.captions) > 0 and set(held_out.captions) == {"a handwritten digit <nine>"}


def test_a_fine_tune_without_an_instance_prompt_keeps_the_digit_prompts_and_captions(pipe):
    context = EvalContext(pipe, nines_fine_tune("lora"), EvalSettings(num_samples=2, sample_steps=2))
    assert context.generated().prompts == ["a handwritten digit nine"] * 2
    assert all("nine" in caption and "<" not in caption for caption in context.held_out().captions)


def test_same_model_and_seed_give_identical_numbers_and_another_seed_others(pipe, results):
    again = evaluate(EvalContext(pipe, DIGITS, SETTINGS), LOCAL)
    assert {n: (r.value, r.spread, r.details) for n, r in again.items()} == \
        {n: (r.value, r.spread, r.details) for n, r in results.items()}
    other = evaluate(EvalContext(pipe, DIGITS, EvalSettings(num_samples=20, sample_steps=2, seed=7,
                                                            bpd_timesteps=4)), ["kid", "bpd"])
    assert other["kid"].value != results["kid"].value and other["bpd"].value != results["bpd"].value


def test_evaluation_leaves_the_callers_random_stream_as_it_was(pipe):
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    evaluate(EvalContext(pipe, DIGITS, SETTINGS), ["kid", "val_loss"])
    assert torch.equal(torch.rand(3), expected)


def test_val_loss_is_the_validation_loss_of_a_given_held_out_set(pipe):
    """What the training loop passes in (its ValidationSet) is what val_loss is computed on."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    vset = SimpleNamespace(latents=torch.randn(6, 4, 8, 8, generator=g), text_embeddings=torch.randn(6, 8, 384,
                                                                                                      generator=g))
    result = evaluate(EvalContext(pipe, DIGITS, SETTINGS, validation_set=vset), ["val_loss"])["val_loss"]
    direct = validation_loss(pipe.unet, build_noise_scheduler(DIGITS.noise, "epsilon"), vset.latents,
                             vset.text_embeddings, "epsilon", timesteps=5)
    assert result.value == direct["loss"] and result.count == 6


@pytest.mark.parametrize("names, settings, source, error, words", [
    (["fid"], SETTINGS, "builtin:digits", ConfigError, ["unknown metric 'fid'", "val_loss, fd, kid"]),
    (["clip"], SETTINGS, "builtin:digits", ConfigError, ["--clip FOLDER", "CLIPModel"]),
    (["fd"], SETTINGS, "photos/", ModelFileError, ["--inception PATH", "inception-2015-12-05.pt"]),
    (["adherence"], EvalSettings(inception="x.pt"), "photos/", ConfigError, ["builtin:digits", "--metrics"]),
])
def test_a_metric_that_cannot_be_computed_fails_before_any_work_naming_what_to_give(names, settings, source, error,
                                                                                     words):
    config = RunConfig.model_validate({"data": {"source": source}})
    with pytest.raises(error) as raised:
        check_requirements(names, config, settings)
    assert all(w in str(raised.value) for w in words) and "\n" not in str(raised.value)


def test_other_data_computes_val_loss_and_bpd_and_fd_kid_only_in_inception_space():
    config = RunConfig.model_validate({"data": {"source": "photos/"}})
    assert available_metrics(config, EvalSettings()) == ["val_loss", "bpd"]
    assert available_metrics(config, EvalSettings(inception="x.pt")) == ["val_loss", "fd", "kid", "bpd"]


def test_the_settings_key_changes_with_what_the_number_depends_on(tmp_path):
    weights = tmp_path / "inception.pt"
    weights.write_bytes(b"one")
    base = metric_settings("fd", EvalSettings(inception=str(weights)), DIGITS)
    assert base == metric_settings("fd", EvalSettings(inception=str(weights)), DIGITS)
    assert base != metric_settings("fd", EvalSettings(inception=str(weights), num_samples=50), DIGITS)
    assert base != metric_settings("fd", EvalSettings(), DIGITS)  # digit features, not Inception
    weights.write_bytes(b"other")  # the same path, other weights
    assert base != metric_settings("fd", EvalSettings(inception=str(weights)), DIGITS)
    assert metric_settings("val_loss", EvalSettings(num_samples=5), DIGITS) == \
        metric_settings("val_loss", EvalSettings(num_samples=50), DIGITS)  # val_loss uses a fixed held-out set
    assert metric_settings("bpd", EvalSettings(weights="raw"), DIGITS)["weights"] == "raw"


class ChannelMeans(torch.nn.Module):
    """A TorchScript archive with the FID detector's call signature and 2,048 cheap features (channel means):
    enough to run the Inception path without the real weights."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return img.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]


def photo_context(pipe, **settings) -> EvalContext:
    """Data other than the digits: four held-out images with captions, given as a training loop would."""
    from stablediff.evaluation.context import HeldOut

    config = RunConfig.model_validate({"data": {"source": "photos/", "resolution": 16}})
    images = torch.linspace(-1, 1, 4 * 3 * 16 * 16).reshape(4, 3, 16, 16)
    captions = ["a red square", "sea", "a car", "dogs"]
    return EvalContext(pipe, config, EvalSettings(num_samples=4, sample_steps=2, bpd_timesteps=4, **settings),
                       held_out_data=HeldOut(images, captions))


def test_inception_features_score_any_data_against_its_held_out_images(pipe, tmp_path):
    archive = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(ChannelMeans()).save(str(archive))
    context = photo_context(pipe, inception=str(archive))
    results = evaluate(context, ["fd", "kid", "bpd", "val_loss"])
    assert context.generated().prompts == ["a red square", "sea", "a car", "dogs"]  # the held-out captions
    fd = results["fd"]
    assert fd.details["feature_dim"] == 2048 and fd.details["reference_count"] == 4 and fd.count == 4
    assert fd.details["feature_space"].startswith("inception:") and fd.settings["features"] == \
        fd.details["feature_space"]
    assert results["bpd"].count == 4 and results["val_loss"].count == 4
    assert np.isfinite(fd.value) and np.isfinite(results["kid"].value)


def test_clip_scores_the_generated_images_against_their_prompts(pipe, clip_folder):
    from stablediff.evaluation.clip_score import load_clip

    context = photo_context(pipe, clip=str(clip_folder))
    result = evaluate(context, ["clip"])["clip"]
    expected = load_clip(clip_folder).score(context.generated().images, context.generated().prompts)
    assert (result.value, result.spread, result.count) == (expected.mean, expected.std, 4)
