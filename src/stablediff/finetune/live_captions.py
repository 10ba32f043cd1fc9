"""Textual inversion in the training loop: the step's captions encoded through the new token's vectors.

The loop draws caption rows of the dataset's caption table (training/batches.py);
`encode_rows` turns them into (B, L, D) embeddings with gradients to the token's
vectors, where a training run reads its cached embeddings instead.
"""

from __future__ import annotations

import torch

from stablediff.errors import ConfigError
from stablediff.finetune.textual_inversion import TextualInversion


class LiveCaptions(torch.nn.Module):
    """The caption table plus the token being learned; its one parameter is the token's vectors."""

    def __init__(self, inversion: TextualInversion, captions: list[str]) -> None:
        super().__init__()
        self.inversion = inversion
        self.vectors = inversion.learned  # registered here, so the optimizer's parameter groups see it
        self.captions = list(captions)  # the EncodedDataset's caption table: row r is captions[r]

    def encode_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.inversion.encode([self.captions[int(r)] for r in rows])

    def encode(self, captions: list[str]) -> torch.Tensor:
        return self.inversion.encode(captions)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.inversion.state_dict()

    def load_state_dict(self, state, *args, **kwargs) -> None:
        self.inversion.load_state_dict(dict(state))


def make_live_captions(pipe, cfg, captions: list[list[str]], accumulation_steps: int) -> LiveCaptions:
    """The new token on the pipeline's tokenizer and text encoder (changed in place), over `captions`."""
    from stablediff.training.encoded_dataset import caption_table

    if accumulation_steps > 1:
        raise ConfigError("textual inversion encodes each step's captions once, so it trains with "
                          "train.gradient_accumulation_steps: 1; raise train.batch_size instead")
    table, _ = caption_table(captions)
    if not any(cfg.token in caption for caption in table):
        raise ConfigError(f"finetune.token {cfg.token!r} is in no training caption, so it would never train; set "
                          f"finetune.instance_prompt to a caption with it, e.g. 'a picture of {cfg.token}'")
    inversion = TextualInversion(pipe.tokenizer, pipe.text_encoder, cfg.token, cfg.init_token, cfg.num_vectors)
    return LiveCaptions(inversion, table)


def embedding_of(loaded, source: str) -> tuple[str, torch.Tensor]:
    """(token, vectors (n, width)) of a textual-inversion checkpoint."""
    from stablediff import run_schema as schema
    from stablediff.errors import CheckpointError

    record = loaded.meta.get(schema.TEXTUAL_INVERSION) or {}
    vectors = schema.unprefixed(schema.EMBEDDING, loaded.tensors).get("vectors")
    if not record.get("token") or vectors is None:
        raise CheckpointError(f"{source} is not a textual-inversion checkpoint (no embedding/vectors); "
                              "--format embedding exports the token of a finetune.method: textual_inversion run")
    return record["token"], vectors


def write_embedding_export(loaded, out_folder, source: str):
    """OUT_FOLDER/<token>.safetensors: A1111 and ComfyUI name an embedding by its file name."""
    from pathlib import Path

    from stablediff.inference.embedding_files import save_embedding

    token, vectors = embedding_of(loaded, source)
    Path(out_folder).mkdir(parents=True, exist_ok=True)
    return save_embedding(Path(out_folder) / f"{token}.safetensors", token, vectors,
                          {"stablediff.step": str(loaded.step)})
