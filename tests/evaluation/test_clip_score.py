"""CLIP score: max(100 * cos(E_image, E_text), 0) with a local CLIPModel folder, never the hub, never a pickle.

The model is a tiny random CLIPModel saved into a temporary folder: its scores mean nothing about
adherence, so the tests check the arithmetic, the determinism and the folder handling.
"""

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch

from stablediff.errors import ModelFileError
from stablediff.evaluation.clip_score import clip_scores, load_clip
from stablediff.inference.prompts import TruncatedPromptWarning
from stablediff.io.pickle_guard import PickleRefusedError
from tests.evaluation.conftest import MAX_TOKENS


@pytest.fixture(scope="module")
def scorer(clip_folder):
    return load_clip(clip_folder)


def random_images(n: int, seed: int = 0, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


PROMPTS = ["a cat", "dogs", "a car", "sea"]  # at most 6 tokens with the special ones: none truncated


def test_the_formula_is_100_times_the_cosine_floored_at_zero():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [-1.0, 0.0]])
    expected = [100.0, 100.0 / math.sqrt(2), 0.0, 0.0]  # same, 45 degrees, orthogonal, opposite (floored)
    assert clip_scores(image, text).tolist() == pytest.approx(expected, abs=1e-9)


def test_the_formula_ignores_the_embeddings_scale():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    torch.testing.assert_close(clip_scores(image * 7.0, text * 0.1), clip_scores(image, text))


def test_scores_lie_in_0_100_with_mean_std_and_count(scorer):
    result = scorer.score(random_images(4), PROMPTS)
    assert result.count == 4 and len(result.scores) == 4
    assert all(0.0 <= s <= 100.0 for s in result.scores)
    assert result.mean == pytest.approx(np.mean(result.scores))
    assert result.std == pytest.approx(np.std(result.scores, ddof=1))
    assert json.loads(json.dumps(result.to_json()))["count"] == 4


def test_the_score_matches_a_direct_computation_with_the_same_model(clip_folder, scorer):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    model = CLIPModel.from_pretrained(clip_folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_folder, local_files_only=True)
    processor = CLIPImageProcessorPil.from_pretrained(clip_folder, local_files_only=True)
    images = random_images(4, seed=3)
    with torch.no_grad():  # CLIPModel's forward normalises both embeddings itself
        out = model(**tokenizer(PROMPTS, padding=True, return_tensors="pt"),
                    pixel_values=processor(images=list(images), return_tensors="pt")["pixel_values"])
    cosine = (out.image_embeds.double() * out.text_embeds.double()).sum(-1)
    expected = torch.clamp(100 * cosine, min=0)
    assert expected.max() > 0  # not all floored: the comparison below sees real cosines
    assert scorer.score(images, PROMPTS).scores == pytest.approx(expected.tolist(), abs=1e-4)


def test_the_same_images_and_prompts_give_the_same_numbers(scorer, clip_folder):
    images = random_images(4, seed=1)
    first = scorer.score(images, PROMPTS)
    assert scorer.score(images, PROMPTS) == first
    assert load_clip(clip_folder).score(images, PROMPTS).scores == first.scores  # a fresh load too


def test_batching_does_not_change_the_scores(scorer):
    images = random_images(4, seed=2)
    whole, one_by_one = scorer.score(images, PROMPTS), scorer.score(images, PROMPTS, batch_size=1)
    assert one_by_one.scores == pytest.approx(whole.scores, abs=1e-4)


def test_a_prompt_longer_than_the_text_encoder_is_truncated_with_a_warning(scorer):
    long = "a very long prompt about many things"  # one token per character: far past 8
    images = random_images(2, seed=4)
    with pytest.warns(TruncatedPromptWarning, match="1 of 2 prompts are truncated"):
        result = scorer.score(images, [long, "a cat"])
    assert result.truncated == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits warns nothing
        same_start = scorer.score(images[:1], [long[:4]])
    assert same_start.truncated == 0
    # What is kept: the first tokens and the end-of-text token CLIP pools, so the prompt's beginning decides.
    tokens = scorer.tokenizer([long], truncation=True, max_length=scorer.max_length).input_ids[0]
    assert len(tokens) == MAX_TOKENS and tokens[-1] == scorer.tokenizer.eos_token_id


def test_images_and_prompts_must_pair_one_to_one(scorer):
    with pytest.raises(ValueError, match="one to one"):
        scorer.score(random_images(3), PROMPTS)


def test_a_missing_folder_says_what_to_provide(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist.*config.json.*safetensors.*preprocessor_config.json"):
        load_clip(tmp_path / "nowhere")


def test_a_folder_missing_parts_names_each_of_them(clip_folder, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(clip_folder, folder)
    (folder / "model.safetensors").unlink()
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(ModelFileError, match="no model weights.*no preprocessor_config.json"):
        load_clip(folder)


def test_a_folder_of_another_model_type_is_refused(clip_folder, tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(clip_folder, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelFileError, match="config.json is a 'bert' model"):
        load_clip(folder)


def test_pickle_weights_are_refused_without_trust(clip_folder, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(clip_folder, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"logit_scale": torch.tensor(1.0)}, folder / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="pytorch_model.bin.*--trust-pickle"):
        load_clip(folder)


def test_trusted_pickle_weights_load_and_score_the_same(clip_folder, scorer, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(clip_folder, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    images = random_images(2, seed=5)
    assert load_clip(folder, trust_pickle=True).score(images, PROMPTS[:2]) == scorer.score(images, PROMPTS[:2])


def test_weights_lacking_tensors_are_refused_not_filled_with_noise(clip_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "text-only"
    shutil.copytree(clip_folder, folder)
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("vision_model.")}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="lack .* tensors .*vision_model"):
        load_clip(folder)
