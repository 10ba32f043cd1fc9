"""Captions encoded in the training loop, with gradients to what trains in the text encoder.

Textual inversion (the new token's vectors) and text-encoder LoRA (adapters on the
encoder's attention and MLP) both change what a caption encodes to, so their
captions cannot come from the feature cache. The loop draws caption rows of the
dataset's caption table (training/batches.py); `encode_rows` turns them into
(B, L, D) embeddings through the current trainable weights, where a training
run reads its cached embeddings instead. Both run the text encoder in eval mode
(no dropout: what training encodes is what generation encodes).
"""

from __future__ import annotations

import torch

from stablediff import run_schema as schema
from stablediff.errors import ConfigError
from stablediff.finetune.textual_inversion import TextualInversion
from stablediff.models.adapters import load_trained, trained_tensors
from stablediff.models.text_encoder import encode_captions


class LiveCaptions(torch.nn.Module):
    """The caption table plus the text encoder's trainable part: a `TextualInversion` or a `LoraTextEncoder`.

    `registered` (the token's vectors, or the LoRA'd encoder module) is registered here, so that the
    optimizer's parameter groups see it; only its parameters with requires_grad train. `group` is the
    checkpoint's tensor group of `state_dict()` (run_schema)."""

    def __init__(self, encoder, captions: list[str], group: str, **registered) -> None:
        super().__init__()
        self.encoder = encoder
        self.group = group
        for name, value in registered.items():
            setattr(self, name, value)
        self.captions = list(captions)  # the EncodedDataset's caption table: row r is captions[r]

    def encode_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode([self.captions[int(r)] for r in rows])

    def encode(self, captions: list[str]) -> torch.Tensor:
        return self.encoder.encode(captions)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.encoder.state_dict()

    def load_state_dict(self, state, *args, **kwargs) -> None:
        self.encoder.load_state_dict(dict(state))


class LoraTextEncoder:
    """A text encoder with LoRA adapters attached (finetune/lora.py); they alone train."""

    def __init__(self, tokenizer, model: torch.nn.Module, config: dict) -> None:
        self.tokenizer, self.model, self.config = tokenizer, model, config  # config: the adapters' LoraConfig

    def encode(self, captions: list[str]) -> torch.Tensor:
        """(B, max_length, width) float32, with gradients to the adapters."""
        return encode_captions(self.tokenizer, self.model, list(captions))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters' tensors by the encoder's state-dict names (`...q_proj.lora_A.default.weight`)."""
        return trained_tensors(self.model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trained(self.model, state, "the checkpoint's text encoder adapters")


def make_live_captions(pipe, cfg, captions: list[list[str]], accumulation_steps: int,
                       seed: int = 0) -> LiveCaptions | None:
    """What the method trains in the pipeline's text encoder (changed in place), over `captions`; None when
    the text encoder does not train (the cached embeddings are then exact)."""
    from stablediff.training.encoded_dataset import caption_table

    lora = cfg.method == "lora" and cfg.text_encoder.lora
    if cfg.method != "textual_inversion" and not lora:
        return None
    if accumulation_steps > 1:
        what = "text-encoder LoRA" if lora else "textual inversion"
        raise ConfigError(f"{what} encodes each step's captions once, with gradients through the text encoder, so "
                          "it trains with train.gradient_accumulation_steps: 1; raise train.batch_size instead")
    table, _ = caption_table(captions)
    if lora:
        from stablediff.finetune.lora import add_text_encoder_lora

        config = add_text_encoder_lora(pipe.text_encoder, cfg.text_encoder.settings(cfg.lora), seed)
        return LiveCaptions(LoraTextEncoder(pipe.tokenizer, pipe.text_encoder, config), table, schema.TEXT_ENCODER,
                            text_encoder=pipe.text_encoder)
    if not any(cfg.token in caption for caption in table):
        raise ConfigError(f"finetune.token {cfg.token!r} is in no training caption, so it would never train; set "
                          f"finetune.instance_prompt to a caption with it, e.g. 'a picture of {cfg.token}'")
    inversion = TextualInversion(pipe.tokenizer, pipe.text_encoder, cfg.token, cfg.init_token, cfg.num_vectors)
    return LiveCaptions(inversion, table, schema.EMBEDDING, vectors=inversion.learned)


def embedding_of(loaded, source: str) -> tuple[str, torch.Tensor]:
    """(token, vectors (n, width)) of a textual-inversion checkpoint."""
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
