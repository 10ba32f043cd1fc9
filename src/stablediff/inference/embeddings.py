"""Textual-inversion embeddings at inference: `--embedding FILE`, new words for the text encoder.

An embedding of n vectors becomes n added tokens, `name`, `name_1`, ...,
`name_{n-1}`, whose rows are appended to the text encoder's input-embedding
matrix; diffusers' pipelines expand `name` in the prompt and the negative prompt
to `name name_1 ... name_{n-1}` (their `maybe_convert_prompt`), as A1111 does
with its vectors. diffusers' own `load_textual_inversion` is not used: it grows
the matrix with `resize_token_embeddings` (drawing from the global RNG) and its
unloading truncates a BERT vocabulary (whose special tokens sit at ids 100-103),
and it adds tokens that match inside words and only in lower case on BERT.

Tokens are added as whole words, case-sensitive, exactly as the file is named
(`ink-style.safetensors` -> `ink-style`; not `Ink-Style`, not inside `ink-styles`).
It works the same for CLIP and our BERT/MiniLM tokenizer.

`apply_embeddings(pipe, specs)` makes exactly `specs` loaded, like `apply_loras`:
the same files again change nothing (two generate calls never add a token
twice), and a call without an embedding loaded earlier gets the model's
original tokenizer and embedding matrix back.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stablediff.errors import GenerationError
from stablediff.inference.embedding_files import check_embedding_path, embedding_name, read_embedding
from stablediff.inference.metadata import file_short_hash
from stablediff.models.token_vectors import add_token_vectors, new_token_problem

if TYPE_CHECKING:  # torch loads on first use, as for the rest of the inference API
    import torch

# The pipeline attribute holding what `apply_embeddings` changed (and how to undo it).
_STATE_ATTRIBUTE = "_stablediff_embeddings"


@dataclass(frozen=True)
class EmbeddingSpec:
    path: Path
    trust_pickle: bool = False  # a .pt/.bin embedding is read only when the user said so

    @property
    def name(self) -> str:
        return embedding_name(self.path)


def parse_embedding_arg(text: str | Path, trust_pickle: bool = False) -> EmbeddingSpec:
    """`--embedding FILE`: checked at once (exists, embedding suffix, not a refused pickle)."""
    return EmbeddingSpec(check_embedding_path(Path(text).expanduser(), trust_pickle), trust_pickle)


@dataclass
class _Loaded:
    """What the pipeline had before any embedding, and which files (by content hash) are in it now."""

    tokenizer: object
    input_embeddings: torch.nn.Module
    vocab_size: int
    hashes: dict[str, str]  # prompt word -> file hash


def apply_embeddings(pipe, specs: list[EmbeddingSpec] | tuple[EmbeddingSpec, ...]) -> None:
    """Make exactly `specs` the embeddings of `pipe` (a diffusers Stable Diffusion pipeline)."""
    hashes = [(spec.name, file_short_hash(spec.path)) for spec in specs]
    wanted = dict(hashes)  # the same file twice is loaded once
    clash = next((name for name, hash_ in hashes if wanted[name] != hash_), None)
    if clash is not None:
        raise GenerationError(f"two different embedding files are named {clash!r} (a prompt word is its file's "
                              "name); rename one of them")
    state: _Loaded | None = getattr(pipe, _STATE_ATTRIBUTE, None)
    if state is not None and state.hashes == wanted:
        return
    if state is not None and not wanted.items() >= state.hashes.items():
        _restore(pipe, state)  # one loaded earlier is not wanted now: start again from the original model
        state = None
    if state is None:
        if not wanted:
            return
        encoder = pipe.text_encoder
        state = _Loaded(copy.deepcopy(pipe.tokenizer), encoder.get_input_embeddings(),
                        int(encoder.config.vocab_size), {})
        setattr(pipe, _STATE_ATTRIBUTE, state)
    for spec in specs:
        if spec.name not in state.hashes:
            _load_one(pipe, spec)
            state.hashes[spec.name] = wanted[spec.name]


def _restore(pipe, state: _Loaded) -> None:
    pipe.tokenizer = copy.deepcopy(state.tokenizer)  # the kept copy stays clean for the next restore
    pipe.text_encoder.set_input_embeddings(state.input_embeddings)
    pipe.text_encoder.config.vocab_size = state.vocab_size
    delattr(pipe, _STATE_ATTRIBUTE)


def _load_one(pipe, spec: EmbeddingSpec) -> None:
    name, vectors = read_embedding(spec.path, spec.trust_pickle)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if vectors.shape[1] != width:
        raise GenerationError(
            f"embedding {spec.path} has vectors {vectors.shape[1]} wide and this model's text encoder "
            f"({type(pipe.text_encoder).__name__}) takes {width}-wide token embeddings; it was made for another "
            "base model (768: Stable Diffusion 1.x, 1024: 2.x). Use an embedding trained on this model's family")
    problem = new_token_problem(pipe.tokenizer, name)
    if problem:
        raise GenerationError(f"embedding {spec.path}: its prompt word (the file name) {problem}; rename the file "
                              f"to a word the model does not know, e.g. <{name}>{spec.path.suffix}")
    add_token_vectors(pipe.tokenizer, pipe.text_encoder, name, vectors)
