"""config/finetune.py: the finetune section's text-encoder LoRA settings and what it refuses.

(Named test_finetune_config, not test_finetune: tests/e2e/test_finetune.py has that basename.)
"""

import pytest

from stablediff.config import load_config
from stablediff.errors import ConfigError

BASE = "finetune.base=x"


def test_text_encoder_lora_is_off_by_default_and_takes_the_unets_rank_and_alpha():
    ft = load_config("tiny", [BASE]).finetune
    assert ft.text_encoder.lora is False
    ft = load_config("tiny", [BASE, "finetune.lora.rank=4", "finetune.lora.alpha=2", "finetune.text_encoder.lora=true",
                              "finetune.text_encoder.learning_rate=5e-5"]).finetune
    assert (ft.text_encoder.learning_rate, ft.text_encoder.settings(ft.lora).rank) == (5e-5, 4)
    assert ft.text_encoder.settings(ft.lora).scale_alpha == 2.0
    own = load_config("tiny", [BASE, "finetune.text_encoder.lora=true", "finetune.text_encoder.rank=2"]).finetune
    assert own.text_encoder.settings(own.lora).rank == 2 and own.text_encoder.settings(own.lora).scale_alpha == 2.0


@pytest.mark.parametrize("method", ["full", "textual_inversion"])
def test_text_encoder_lora_needs_method_lora(method):
    extra = ["finetune.token=<t>", "finetune.init_token=one"] if method == "textual_inversion" else []
    with pytest.raises(ConfigError, match="needs finetune.method: lora") as error:
        load_config("tiny", [BASE, f"finetune.method={method}", "finetune.text_encoder.lora=true", *extra])
    assert repr(method) in str(error.value)


@pytest.mark.parametrize("key, value", [("learning_rate", "1e-5"), ("rank", "4"), ("alpha", "2")])
def test_a_text_encoder_setting_without_lora_true_is_refused(key, value):
    with pytest.raises(ConfigError, match=f"finetune.text_encoder.{key} is set but finetune.text_encoder.lora"):
        load_config("tiny", [BASE, f"finetune.text_encoder.{key}={value}"])


def test_a_learning_rate_of_zero_is_refused():
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config("tiny", [BASE, "finetune.text_encoder.lora=true", "finetune.text_encoder.learning_rate=0"])
