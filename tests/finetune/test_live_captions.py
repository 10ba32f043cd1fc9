"""finetune/live_captions.py: textual inversion's captions in the loop, and the settings it refuses."""

import pytest
import torch

from stablediff.config import load_config
from stablediff.errors import ConfigError
from stablediff.finetune.live_captions import make_live_captions
from tests.models.tiny_sd import tiny_pipeline

TI = ["finetune.base=x", "finetune.method=textual_inversion", "finetune.token=<nine>", "finetune.init_token=nine"]


def ti_config(*extra):
    return load_config("tiny", [*TI, *extra]).finetune


def test_textual_inversion_needs_its_token_and_refuses_freeze_patterns():
    with pytest.raises(ConfigError, match="needs finetune.token"):
        load_config("tiny", ["finetune.base=x", "finetune.method=textual_inversion"])
    with pytest.raises(ConfigError, match="textual inversion trains only the token"):
        load_config("tiny", [*TI, 'finetune.freeze=["down_blocks.*"]'])
    with pytest.raises(ConfigError, match="finetune.token is for method: textual_inversion"):
        load_config("tiny", ["finetune.base=x", "finetune.token=<nine>"])


def test_a_token_in_no_caption_and_gradient_accumulation_are_refused():
    with pytest.raises(ConfigError, match="is in no training caption"):
        make_live_captions(tiny_pipeline(), ti_config(), [["a handwritten digit nine"]], 1)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps: 1"):
        make_live_captions(tiny_pipeline(), ti_config(), [["a digit <nine>"]], 2)


def test_rows_are_encoded_through_the_trainable_vectors():
    live = make_live_captions(tiny_pipeline(), ti_config(), [["a digit <nine>"], ["a digit one"]], 1)
    embeddings = live.encode_rows(torch.tensor([1, 2]))  # row 0 is the empty caption
    embeddings[0].sum().backward()
    assert live.vectors.grad is not None and live.vectors.grad.abs().sum() > 0
    assert [name for name, _ in live.named_parameters()] == ["vectors"]


TE_LORA = ["finetune.base=x", "finetune.text_encoder.lora=true", "finetune.lora.rank=2"]


def test_with_text_encoder_lora_rows_are_encoded_with_gradients_to_the_adapters_alone(tmp_path):
    from tests.models.tiny_sd import tiny_clip_pipeline

    pipe = tiny_clip_pipeline(tmp_path / "tokenizer")
    cached = pipe.text_encoder.eval()
    live = make_live_captions(pipe, load_config("tiny", TE_LORA).finetune, [["a digit one"], ["two"]], 1, seed=0)
    assert live.group == "text_encoder" and live.text_encoder is cached  # the pipeline's encoder, adapted in place
    live.encode_rows(torch.tensor([1, 2])).square().sum().backward()
    graded = {n for n, p in live.named_parameters() if p.grad is not None}
    assert graded == {n for n, p in live.named_parameters() if p.requires_grad} and graded
    assert all(".lora_A." in n or ".lora_B." in n for n in graded)
    assert set(live.state_dict()) == {n[len("text_encoder."):] for n in graded}


def test_without_text_encoder_lora_nothing_is_encoded_live_and_accumulation_is_refused_with_it():
    assert make_live_captions(tiny_pipeline(), load_config("tiny", ["finetune.base=x"]).finetune, [["a"]], 2) is None
    with pytest.raises(ConfigError, match="text-encoder LoRA encodes each step's captions once"):
        make_live_captions(tiny_pipeline(), load_config("tiny", TE_LORA).finetune, [["a"]], 2)
