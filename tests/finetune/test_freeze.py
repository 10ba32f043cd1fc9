"""Freeze / train_only patterns (finetune/freeze.py), with full fine-tuning and among LoRA adapters; the report."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from stablediff.config.finetune import FinetuneConfig
from stablediff.config.schema import UNET_PRESETS
from stablediff.errors import ConfigError
from stablediff.finetune.freeze import apply_freeze, block_of, format_report, trainable_report
from stablediff.finetune.trainable import make_trainable
from tests.models.tiny_sd import tiny_unet


def trainable(unet, method="full", **patterns) -> list[str]:
    cfg = FinetuneConfig(base="unused", method=method, **patterns)
    make_trainable(unet, cfg, seed=0)
    return [name for name, p in unet.named_parameters() if p.requires_grad]


def test_full_fine_tune_trains_everything():
    unet = tiny_unet()
    assert len(trainable(unet)) == len(list(unet.parameters()))


def test_freeze_patterns_take_out_what_they_match():
    unet = tiny_unet()
    names = trainable(unet, freeze=["down_blocks.*", "*.norm*"])
    assert names and not any(n.startswith("down_blocks.") or ".norm" in n for n in names)
    assert "conv_in.weight" in names and any(n.startswith("up_blocks.0.attentions") for n in names)


def test_train_only_keeps_only_what_it_matches():
    names = trainable(tiny_unet(), train_only=["*attn2*"])
    assert names and all("attn2" in n for n in names)
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight" in names


def test_train_only_and_freeze_together():
    names = trainable(tiny_unet(), train_only=["*attn2*"], freeze=["mid_block.*"])
    assert names and all("attn2" in n and not n.startswith("mid_block") for n in names)


@pytest.mark.parametrize("key", ["freeze", "train_only"])
def test_a_pattern_that_matches_nothing_names_it_and_the_blocks(key):
    with pytest.raises(ConfigError) as error:
        trainable(tiny_unet(), **{key: ["down_blocks.*", "downblocks.*"]})
    message = str(error.value)
    assert f"finetune.{key}" in message and "'downblocks.*'" in message and "mid_block" in message, message


def test_freezing_everything_is_an_error():
    with pytest.raises(ConfigError, match="no parameter to train"):
        trainable(tiny_unet(), freeze=["*"])


def test_with_lora_the_patterns_choose_among_the_adapters():
    names = trainable(tiny_unet(), method="lora", freeze=["up_blocks.*"])
    assert names and all("lora_" in n and not n.startswith("up_blocks") for n in names)
    assert any(n.startswith("mid_block") for n in names)
    only = trainable(tiny_unet(), method="lora", train_only=["*attn1*"])
    assert only and all("attn1" in n and "lora_" in n for n in only)


def test_with_lora_a_pattern_over_base_weights_only_matches_nothing():
    # conv_in has no adapter under the attn preset: its weights are frozen base weights, not candidates
    with pytest.raises(ConfigError, match="'conv_in.\\*' matches no trainable parameter"):
        trainable(tiny_unet(), method="lora", freeze=["conv_in.*"])


def test_patterns_work_on_a_sd15_unet_on_meta():
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, **UNET_PRESETS["sd15"])
    names = trainable(unet, method="lora", train_only=["up_blocks.3.*"])
    assert names and all(n.startswith("up_blocks.3.") and "lora_" in n for n in names)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_report_counts_add_up_to_the_models_parameters(method):
    unet = tiny_unet()
    trainable(unet, method=method, freeze=["mid_block.*"])
    rows = trainable_report(unet)
    total = sum(p.numel() for p in unet.parameters())
    trains = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert sum(r["trainable"] + r["frozen"] for r in rows) == total
    assert sum(r["trainable"] for r in rows) == trains
    assert [r["block"] for r in rows][:3] == ["conv_in", "time_embedding", "down_blocks.0"]
    mid = next(r for r in rows if r["block"] == "mid_block")
    assert mid["trainable"] == 0 and mid["frozen"] > 0
    text = format_report(rows)
    assert text.splitlines()[0].startswith(f"trainable parameters: {trains:,} of {total:,} (")
    assert len(text.splitlines()) == len(rows) + 1


@pytest.mark.parametrize("name, block", [("down_blocks.1.attentions.0.proj_in.weight", "down_blocks.1"),
                                         ("mid_block.resnets.0.conv1.weight", "mid_block"),
                                         ("conv_in.bias", "conv_in"), ("time_embedding.linear_1.weight",
                                                                       "time_embedding")])
def test_block_of(name, block):
    assert block_of(name) == block


def test_apply_freeze_leaves_frozen_parameters_frozen():
    unet = tiny_unet().requires_grad_(False)
    unet.conv_out.requires_grad_(True)
    apply_freeze(unet, [], ["conv_out.*"])
    assert [n for n, p in unet.named_parameters() if p.requires_grad] == ["conv_out.weight", "conv_out.bias"]
