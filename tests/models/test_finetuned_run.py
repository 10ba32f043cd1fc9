"""models/finetuned_run.py: a fine-tune checkpoint's pipeline is its base with what trained merged in."""

import torch

from stablediff.config.finetune import TEXT_ENCODER_TARGETS
from stablediff.finetune.lora_files import load_lora_checkpoint
from stablediff.models.finetuned_run import finetuned_pipeline
from stablediff.models.text_encoder import encode_captions
from tests.finetune.lora_fixtures import ATTENTION, add_trained_lora, lora_checkpoint, lora_config_meta
from tests.models.tiny_sd import tiny_pipeline


def test_a_text_encoder_lora_of_our_bert_encoder_is_merged_into_the_pipeline(tmp_path):
    run_dir = tmp_path / "run"
    tiny_pipeline().save_pretrained(run_dir / "base", safe_serialization=True)
    trained = tiny_pipeline()
    add_trained_lora(trained.unet, ATTENTION, 2, 2.0, seed=1)
    targets = list(TEXT_ENCODER_TARGETS["BERT"])
    add_trained_lora(trained.text_encoder, targets, 2, 4.0, seed=2)
    config = {**lora_config_meta(2, 2.0, ATTENTION), "text_encoder": {"r": 2, "lora_alpha": 4.0,
                                                                      "target_modules": targets}}
    groups = {"unet": trained.unet, "ema": trained.unet, "text_encoder": trained.text_encoder}
    loaded = load_lora_checkpoint(lora_checkpoint(run_dir, groups, {"lora_config": config, "finetune_base": {}}))
    pipe = finetuned_pipeline(run_dir, loaded)
    captions = ["a handwritten digit nine"]
    with torch.no_grad():
        expected = encode_captions(trained.tokenizer, trained.text_encoder, captions)
        merged = encode_captions(pipe.tokenizer, pipe.text_encoder, captions)
        plain = encode_captions(pipe.tokenizer, tiny_pipeline().text_encoder, captions)
    assert not any("lora_" in name for name in pipe.text_encoder.state_dict())
    assert torch.allclose(merged, expected, atol=1e-4) and (merged - plain).abs().max() > 1e-3
