"""LoRA targets (finetune/lora.py) on the tiny UNet and on a weightless SD 1.5-shaped one; the adapters attached.

(Named test_finetune_lora, not test_lora: tests/inference/test_lora.py has that basename.)
"""

import pytest
import torch
from diffusers import UNet2DConditionModel

from stablediff.config.finetune import ATTENTION, CONVOLUTIONS, FEED_FORWARD, LoraSettings
from stablediff.config.schema import UNET_PRESETS
from stablediff.errors import ConfigError
from stablediff.finetune.lora import (add_lora, add_text_encoder_lora, lora_config, resolve_targets,
                                   text_encoder_targets)
from tests.models.tiny_sd import tiny_unet


def sd15_on_meta() -> UNet2DConditionModel:
    """SD 1.5's UNet shape (860M parameters) without its memory: every tensor on the meta device."""
    with torch.device("meta"):
        return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, **UNET_PRESETS["sd15"])


@pytest.fixture(scope="module", params=["tiny", "sd15"])
def unet(request) -> UNet2DConditionModel:
    return tiny_unet() if request.param == "tiny" else sd15_on_meta()


def adaptable(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


@pytest.mark.parametrize("preset, expected", [("attn", ATTENTION), ("attn+ff", ATTENTION + FEED_FORWARD),
                                              ("conv", ATTENTION + FEED_FORWARD + CONVOLUTIONS)])
def test_presets_resolve_to_suffixes_that_each_name_layers(unet, preset, expected):
    targets = resolve_targets(preset, unet)
    assert targets == list(expected)
    layers = adaptable(unet)
    for suffix in targets:
        assert any(name == suffix or name.endswith("." + suffix) for name in layers), suffix


def test_all_linear_is_every_linear_layer(unet):
    targets = resolve_targets("all-linear", unet)
    linear = sorted(n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear))
    assert targets == linear and "time_embedding.linear_1" in targets
    assert not any(isinstance(dict(unet.named_modules())[t], torch.nn.Conv2d) for t in targets)


def test_a_sd15_unet_gets_the_counts_of_layers_kohya_users_expect():
    unet = sd15_on_meta()
    attn = [n for n in adaptable(unet) if n.endswith(".to_q")]
    assert len(attn) == 32  # 16 transformer blocks, each with self- and cross-attention


def test_a_target_that_does_not_exist_names_it_and_real_layer_names(unet):
    with pytest.raises(ConfigError) as error:
        resolve_targets(["to_q", "to_qkv"], unet)
    message = str(error.value)
    assert "'to_qkv'" in message and "'to_q'" not in message and "to_k" in message, message
    assert "to_out.0" in message and " 0," not in message  # whole suffixes a user can write, not bare indices


def test_a_preset_that_matches_nothing_is_an_error():
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ConfigError, match="'attn' matches no layer"):
        resolve_targets("attn", plain)


def test_lora_config_carries_the_settings():
    settings = LoraSettings(rank=4, targets=["to_q", "to_v"], init="gaussian", dora=True, dropout=0.1)
    config = lora_config(settings, tiny_unet())
    assert config == {"r": 4, "lora_alpha": 4.0, "lora_dropout": 0.1, "target_modules": ["to_q", "to_v"],
                      "init_lora_weights": "gaussian", "use_dora": True}
    assert lora_config(LoraSettings(rank=4, alpha=2), tiny_unet())["lora_alpha"] == 2.0


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 3, 384, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10]), encoder_hidden_states=text).sample


def test_add_lora_trains_only_adapters_starts_at_the_base_and_is_seeded():
    plain = tiny_unet()
    before = unet_output(plain)
    a, b = tiny_unet(), tiny_unet()
    config = add_lora(a, LoraSettings(rank=2, targets="attn+ff"), seed=5)
    add_lora(b, LoraSettings(rank=2, targets="attn+ff"), seed=5)
    trains = [n for n, p in a.named_parameters() if p.requires_grad]
    assert trains and all(".lora_A." in n or ".lora_B." in n for n in trains)
    assert any("ff.net.2.lora_A" in n for n in trains) and config["target_modules"][-1] == "ff.net.2"
    assert torch.equal(unet_output(a), before)  # B starts at zero: the adapted model is the base
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    c = tiny_unet()
    add_lora(c, LoraSettings(rank=2, targets="attn+ff"), seed=6)
    lora_a = [n for n in trains if ".lora_A." in n][0]
    assert not torch.equal(dict(a.named_parameters())[lora_a], dict(c.named_parameters())[lora_a])


def test_conv_preset_adapts_convolutions_of_a_sd15_unet_on_meta():
    unet = sd15_on_meta()
    add_lora(unet, LoraSettings(rank=4, targets="conv"), seed=0)
    trains = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert any(n.startswith("down_blocks.0.resnets.0.conv1.lora_A") for n in trains)
    assert any("upsamplers.0.conv.lora_B" in n for n in trains)
    assert all("lora_" in n for n in trains)


def test_lora_config_records_rank_and_module_dropout_when_on_and_the_record_rebuilds_the_adapters():
    from stablediff.models.adapters import attach_lora

    config = lora_config(LoraSettings(rank=2, rank_dropout=0.1, module_dropout=0.25), tiny_unet())
    assert (config["rank_dropout"], config["module_dropout"]) == (0.1, 0.25)
    assert "rank_dropout" not in lora_config(LoraSettings(rank=2, module_dropout=0.25), tiny_unet())
    attach_lora(tiny_unet(), config)  # as an export rebuilds them from a checkpoint's meta: peft gets its own keys


def lora_grads(settings: LoraSettings, checkpointing: bool = False) -> dict[str, torch.Tensor | None]:
    """The adapters' gradients of one training forward/backward of the tiny UNet (global seed 0)."""
    unet = tiny_unet()
    add_lora(unet, settings, seed=5)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 3, 384, generator=generator)
    torch.manual_seed(0)
    unet(latents, torch.tensor([10, 500]), encoder_hidden_states=text).sample.square().mean().backward()
    return {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}


def test_a_lora_training_step_changes_with_rank_and_module_dropout_on():
    plain = lora_grads(LoraSettings(rank=2, targets="attn+ff"))
    ranks = lora_grads(LoraSettings(rank=2, targets="attn+ff", rank_dropout=0.5))
    modules = lora_grads(LoraSettings(rank=2, targets="attn+ff", module_dropout=0.5))
    assert all(g is not None for g in plain.values())
    assert not all(torch.equal(plain[n], ranks[n]) for n in plain)
    skipped = [n for n, g in modules.items() if g is None]  # skipped layers' adapters get no gradient at all
    assert 0 < len(skipped) < len(modules)


def test_gradient_checkpointing_recomputes_the_same_draws():
    settings = LoraSettings(rank=2, targets="attn+ff", init="gaussian", rank_dropout=0.5, module_dropout=0.5)
    plain, recomputed = lora_grads(settings), lora_grads(settings, checkpointing=True)
    assert any(g is None for g in plain.values())
    for name, grad in plain.items():  # torch's checkpoint replays the generator state of the first forward
        assert (grad is None and recomputed[name] is None) or torch.equal(grad, recomputed[name]), name


def test_the_dropouts_apply_to_method_lora_only_and_rank_dropout_not_to_dora():
    from stablediff.config import load_config

    with pytest.raises(ConfigError, match="method full trains none"):
        load_config("tiny", ["finetune.base=x", "finetune.method=full", "finetune.lora.module_dropout=0.1"])
    with pytest.raises(ConfigError, match="DoRA"):
        load_config("tiny", ["finetune.base=x", "finetune.lora.dora=true", "finetune.lora.rank_dropout=0.1"])
    with pytest.raises(ConfigError, match="rank_dropout"):
        load_config("tiny", ["finetune.base=x", "finetune.lora.rank_dropout=1.0"])
    lora = load_config("tiny", ["finetune.base=x", "finetune.lora.dora=true", "finetune.lora.module_dropout=0.1"])
    assert lora.finetune.lora.module_dropout == 0.1


def clip_text_encoder(tmp_path):
    from tests.models.tiny_sd import tiny_clip_pipeline

    return tiny_clip_pipeline(tmp_path / "tokenizer").text_encoder


def minilm():
    from stablediff.models.text_encoder import load_text_encoder

    return load_text_encoder("minilm", max_length=8).model


def test_text_encoder_targets_are_kohyas_attention_and_mlp_linears_of_clip_and_of_bert(tmp_path):
    assert text_encoder_targets(clip_text_encoder(tmp_path)) == ["q_proj", "k_proj", "v_proj", "out_proj", "fc1",
                                                                 "fc2"]
    bert = minilm()
    add_text_encoder_lora(bert, LoraSettings(rank=2), seed=0)
    adapted = {n.split(".lora_A")[0] for n, p in bert.named_parameters() if p.requires_grad and ".lora_A." in n}
    layer = "encoder.layer.0."
    assert {n[len(layer):] for n in adapted if n.startswith(layer)} == {
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense"}
    assert len(adapted) == 6 * 6 and not any(n.startswith("pooler") for n in adapted)  # the pipeline never reads it


def test_text_encoder_lora_trains_only_adapters_starts_at_the_base_and_is_seeded(tmp_path):
    from stablediff.models.text_encoder import encode_captions
    from tests.models.tiny_sd import tiny_clip_pipeline

    pipe = tiny_clip_pipeline(tmp_path / "tokenizer")
    before = encode_captions(pipe.tokenizer, pipe.text_encoder, ["a digit one"])
    config = add_text_encoder_lora(pipe.text_encoder, LoraSettings(rank=2, alpha=1.0), seed=3)
    assert config == {"r": 2, "lora_alpha": 1.0, "lora_dropout": 0.0, "init_lora_weights": True, "use_dora": False,
                      "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
    trains = [n for n, p in pipe.text_encoder.named_parameters() if p.requires_grad]
    assert len(trains) == 2 * 6 * 2 and all(".lora_A." in n or ".lora_B." in n for n in trains)
    assert torch.equal(encode_captions(pipe.tokenizer, pipe.text_encoder, ["a digit one"]), before)
    again = clip_text_encoder(tmp_path)
    add_text_encoder_lora(again, LoraSettings(rank=2, alpha=1.0), seed=3)
    name = trains[0]
    assert torch.equal(dict(again.named_parameters())[name], dict(pipe.text_encoder.named_parameters())[name])


def test_a_text_encoder_of_another_family_is_refused_naming_its_layers():
    with pytest.raises(ConfigError, match="neither a CLIP nor a BERT text model") as error:
        text_encoder_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert "finetune.text_encoder.lora: false" in str(error.value)
