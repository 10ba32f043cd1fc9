"""A prompt past the text encoder's limit is warned about, naming the limit and what is dropped."""

import pytest

from stablediff.inference.prompts import TruncatedPromptWarning, truncation_message

LONG = "a handwritten digit seven drawn with a thick black pen"  # 11 tokens; the tiny model reads 6 (+2 special)


def test_a_prompt_that_fits_gives_no_message(loaded):
    assert truncation_message(loaded.pipe.tokenizer, "a handwritten digit seven") is None
    assert truncation_message(loaded.pipe.tokenizer, None) is None


def test_a_long_prompt_names_the_limit_and_the_dropped_tokens(loaded):
    message = truncation_message(loaded.pipe.tokenizer, LONG, "negative prompt")
    assert message.startswith("the negative prompt is 13 tokens long and the text encoder reads at most 8")
    assert "its last 5 tokens ('with a thick black pen') are ignored" in message


def test_generating_with_a_long_prompt_warns(loaded):
    with pytest.warns(TruncatedPromptWarning, match="reads at most 8"):
        loaded.txt2img(LONG, steps=1)
