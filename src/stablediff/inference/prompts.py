"""Prompts longer than the text encoder reads: diffusers truncates them silently, we say so.

The pipeline encodes `tokenizer.model_max_length` tokens, special tokens included
(77 for CLIP, the configured `text_encoder.max_length` for our MiniLM models);
whatever follows is dropped, so the end of a long prompt changes nothing.
"""

from __future__ import annotations


class TruncatedPromptWarning(UserWarning):
    """Part of a prompt lies past the text encoder's limit and is ignored."""


def truncation_message(tokenizer, text: str | None, what: str = "prompt") -> str | None:
    """None when `text` fits; else a message naming the limit and the tokens that are dropped."""
    if not text:
        return None
    limit = int(tokenizer.model_max_length)
    kept = limit - tokenizer.num_special_tokens_to_add()
    tokens = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    if len(tokens) <= kept:
        return None
    dropped = tokens[kept:]
    words = tokenizer.decode(dropped).strip()
    shown = words if len(words) <= 60 else words[:57] + "..."
    return (f"the {what} is {len(tokens) + limit - kept} tokens long and the text encoder reads at most {limit} "
            f"(special tokens included): its last {len(dropped)} tokens ({shown!r}) are ignored; shorten it")
