"""New words for a tokenizer and their rows in a text encoder's input embeddings (textual inversion).

Training (finetune/textual_inversion.py), `generate --embedding` (inference/embeddings.py) and a
textual-inversion run's pipeline (models/finetuned_run.py) add tokens the same way, so a prompt reads
the same everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def token_names(token: str, num_vectors: int) -> list[str]:
    """`token`, `token_1`, ..., the names diffusers' prompt expansion looks for."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def new_token_problem(tokenizer, token: str) -> str | None:
    """Why `token` cannot be added as a new word of `tokenizer`, or None."""
    if not token or any(ch.isspace() for ch in token):
        return f"{token!r} is empty or holds a space, and a new token is one word"
    vocabulary = tokenizer.get_vocab()
    taken = [name for name in token_names(token, 2) if name in vocabulary]
    if token in vocabulary:
        return f"{token!r} is already a token of the tokenizer"
    if taken:
        return f"{taken[0]!r} (the name of its second vector) is already a token of the tokenizer"
    return None


def add_token_vectors(tokenizer, text_encoder, token: str, vectors: torch.Tensor) -> list[int]:
    """Add `token_names(token, n)` to the tokenizer and their rows `vectors` (n, width) to the encoder's
    input embeddings, leaving every existing row bitwise as it was; returns the new token ids."""
    import torch
    from tokenizers import AddedToken

    embedding = text_encoder.get_input_embeddings()
    width = embedding.weight.shape[1]
    if vectors.ndim != 2 or vectors.shape[1] != width:
        raise ValueError(f"vectors of shape {tuple(vectors.shape)} for a text encoder {width} wide")
    names = token_names(token, vectors.shape[0])
    # single_word: not inside other words; normalized=False: matched as written, also on lower-casing BERT.
    tokenizer.add_tokens([AddedToken(name, single_word=True, normalized=False) for name in names])
    ids = tokenizer.convert_tokens_to_ids(names)
    weight = embedding.weight.detach()
    rows = max(max(ids) + 1, weight.shape[0])
    grown = torch.cat([weight, weight.new_zeros(rows - weight.shape[0], width)])
    grown[ids] = vectors.to(grown)
    replacement = torch.nn.Embedding(rows, width, padding_idx=embedding.padding_idx, device=weight.device,
                                     dtype=weight.dtype)
    replacement.weight = torch.nn.Parameter(grown, requires_grad=embedding.weight.requires_grad)
    text_encoder.set_input_embeddings(replacement)
    text_encoder.config.vocab_size = rows
    return list(ids)
