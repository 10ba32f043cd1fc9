"""Textual inversion: a new word whose input embedding alone trains (Gal et al. 2022, "An Image is Worth
One Word"), for a CLIP text encoder and for our BERT/MiniLM one alike.

The token (and, for `num_vectors` > 1, `token_1` ... `token_{n-1}`, with captions
expanded "tok" -> "tok tok_1 tok_2" as diffusers and A1111 do) is added to the
tokenizer and given rows in the encoder's input-embedding matrix, exactly as
`generate --embedding` adds a file's vectors (inference/embeddings.py), so
training and generation read captions the same way. The trainable vectors are
one separate parameter, substituted for those rows by a forward hook on the
input-embedding module: the matrix and the whole encoder stay frozen, outside
every optimizer, so weight decay cannot touch them (bitwise unchanged), and
whatever else runs the encoder while the hook is on (sampling a pipeline built
on it) sees the current vectors. `remove()` takes the hook off again.
"""

from __future__ import annotations

import torch

from stablediff.errors import ConfigError
from stablediff.models.token_vectors import add_token_vectors, new_token_problem, token_names
from stablediff.models.text_encoder import encode_captions


class TextualInversion:
    """New token(s) of `tokenizer`/`text_encoder` (changed in place) with `num_vectors` trainable vectors."""

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, token: str, init_token: str,
                 num_vectors: int = 1):
        if num_vectors < 1:
            raise ConfigError(f"finetune.num_vectors is {num_vectors}; textual inversion trains at least 1 vector")
        problem = new_token_problem(tokenizer, token) or _known_word_problem(tokenizer, token)
        if problem:
            raise ConfigError(f"finetune.token: {problem}. Textual inversion needs a new word; choose one the "
                              f"tokenizer does not know, such as <{token.strip() or 'my-concept'}>")
        init_vector = _init_vector(tokenizer, text_encoder, init_token)  # (width,)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.token = token
        self.tokens = tuple(token_names(token, num_vectors))
        self.token_ids = tuple(add_token_vectors(tokenizer, text_encoder, token,
                                                 init_vector.expand(num_vectors, -1)))
        if list(self.token_ids) != list(range(self.token_ids[0], self.token_ids[0] + num_vectors)):
            raise RuntimeError(f"new token ids {self.token_ids} are not consecutive")
        # float32 master copy, whatever the encoder's dtype: (num_vectors, width)
        self.learned = torch.nn.Parameter(init_vector.float().repeat(num_vectors, 1).clone())
        self._hook = text_encoder.get_input_embeddings().register_forward_hook(self._substitute)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The one trainable tensor, (num_vectors, width): what the optimizer gets."""
        return [self.learned]

    def vectors(self) -> torch.Tensor:
        """The current vectors, (num_vectors, width), detached: what an embedding file stores."""
        return self.learned.detach().clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"vectors": self.vectors()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        vectors = state["vectors"]
        if tuple(vectors.shape) != tuple(self.learned.shape):
            raise ValueError(f"textual-inversion state has vectors of shape {tuple(vectors.shape)}, this token "
                             f"{self.token!r} has {tuple(self.learned.shape)}")
        with torch.no_grad():
            self.learned.copy_(vectors)

    def expand(self, captions: list[str]) -> list[str]:
        """Captions with a multi-vector token spelled out, by the rule the diffusers pipeline applies."""
        from diffusers.loaders import TextualInversionLoaderMixin

        return TextualInversionLoaderMixin().maybe_convert_prompt(list(captions), self.tokenizer)

    def encode(self, captions: list[str]) -> torch.Tensor:
        """(B, max_length, width) float32 token embeddings, with gradients to the new vectors; for captions
        without the token equal to `TextEncoder.encode`."""
        return encode_captions(self.tokenizer, self.text_encoder, self.expand(captions))

    def remove(self) -> None:
        """Take the hook off: the encoder then reads the rows as they were initialised."""
        self._hook.remove()

    def _substitute(self, _module, args, output: torch.Tensor) -> torch.Tensor:
        input_ids = args[0]  # (B, L)
        position = input_ids - self.token_ids[0]
        is_new = (position >= 0) & (position < len(self.token_ids))
        if not bool(is_new.any()):
            return output
        vectors = self.learned.to(device=output.device, dtype=output.dtype)
        replacement = vectors[position.clamp(0, len(self.token_ids) - 1)]  # (B, L, width)
        return torch.where(is_new.unsqueeze(-1), replacement, output)


def _known_word_problem(tokenizer, token: str) -> str | None:
    """A token the tokenizer already reads as one known piece (CLIP's `cat` is `cat</w>`) would take that
    word away from every prompt."""
    pieces = tokenizer.tokenize(token)
    if len(pieces) == 1 and tokenizer.convert_tokens_to_ids(pieces[0]) != tokenizer.unk_token_id:
        return f"{token!r} is already a word the tokenizer knows (it reads it as {pieces[0]!r})"
    return None


def _init_vector(tokenizer, text_encoder: torch.nn.Module, init_token: str) -> torch.Tensor:
    """The input embedding of `init_token`, which must be exactly one known token."""
    ids = tokenizer(init_token, add_special_tokens=False).input_ids
    unknown = tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids
    if len(ids) != 1 or unknown:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        reason = (f"the tokenizer does not know it (it reads it as {pieces})" if unknown else
                  f"the tokenizer reads it as {len(ids)} tokens {pieces}" if ids else "it is empty")
        raise ConfigError(f"finetune.init_token {init_token!r}: {reason}; the new token starts from the embedding "
                          "of ONE token the tokenizer knows, e.g. a word such as 'dog' or 'style'")
    return text_encoder.get_input_embeddings().weight[ids[0]].detach().clone()
