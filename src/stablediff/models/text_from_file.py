"""The text encoder and tokenizer of a single-file model.

SD single files hold the text encoder's weights but not its config or
tokenizer. Our exports add both to the metadata (`stablediff.text_encoder`,
`stablediff.tokenizer`: the tokenizer's saved files as text), so the file is
self-contained. For files from other tools: an SD 1.x CLIP encoder gets its
config from the shapes and its tokenizer from a local folder the user names
(or the Hugging Face cache, offline); a BERT encoder shaped like the bundled
all-MiniLM-L6-v2 uses that package's config and tokenizer.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from stablediff.errors import ModelFileError
from stablediff.models import architecture
from stablediff.models.state_dict_file import META
CLIP_TOKENIZER_REPO = "openai/clip-vit-large-patch14"  # SD 1.x's tokenizer, looked up in the local cache only


def text_encoder_metadata(model: torch.nn.Module, tokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    return {META + "text_encoder": json.dumps({"class": type(model).__name__, "config": model.config.to_dict()}),
            META + "tokenizer": json.dumps(files)}


def build_text_encoder(kind: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], shapes, source: str,
                       tokenizer_path: Path | None):
    """(model with random weights, tokenizer) for the file's text encoder."""
    from transformers import AutoConfig, AutoModel

    if META + "text_encoder" in metadata:
        stored = json.loads(metadata[META + "text_encoder"])
        config_dict = dict(stored["config"])
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        model = AutoModel.from_config(config)
        if type(model).__name__ != stored["class"]:
            raise ModelFileError(f"{source}: the stored text encoder class {stored['class']!r} is not what transformers "
                                 f"builds from its config ({type(model).__name__})")
    elif kind == "clip":
        from transformers import CLIPTextConfig, CLIPTextModel

        model = CLIPTextModel(CLIPTextConfig(**architecture.infer_clip_config(shapes)))
    elif kind == "bert" and _looks_like_minilm(shapes):
        from stablediff.models.text_encoder import minilm_path

        model = AutoModel.from_config(AutoConfig.from_pretrained(minilm_path(), local_files_only=True))
        model.config.use_attention_mask = True  # as load_text_encoder sets it
    else:
        raise ModelFileError(f"{source} has a text encoder stablediff cannot rebuild: no '{META}text_encoder' metadata "
                             "and not an SD 1.x CLIP or all-MiniLM-L6-v2 layout. Export the model from the tool that "
                             "made it as a diffusers folder and use that.")
    return model, _tokenizer(kind, metadata, source, tokenizer_path)


def _looks_like_minilm(shapes) -> bool:
    prefix = "cond_stage_model."
    layers = {k.split(".")[3] for k in shapes if k.startswith(prefix + "encoder.layer.")}
    return shapes.get(prefix + "embeddings.word_embeddings.weight") == (30522, 384) and len(layers) == 6


def _tokenizer(kind: str, metadata: dict[str, str], source: str, tokenizer_path: Path | None):
    from transformers import AutoTokenizer

    if tokenizer_path is not None:
        return AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    if META + "tokenizer" in metadata:
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in json.loads(metadata[META + "tokenizer"]).items():
                (Path(tmp) / Path(name).name).write_text(text, encoding="utf-8")  # .name: no paths from a file
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    if kind == "bert":
        from stablediff.models.text_encoder import minilm_path

        return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    try:
        return AutoTokenizer.from_pretrained(CLIP_TOKENIZER_REPO, local_files_only=True)
    except OSError:
        raise ModelFileError(f"{source} is an SD 1.x file without a tokenizer, and {CLIP_TOKENIZER_REPO}'s tokenizer is "
                             "not in the local Hugging Face cache. Give a local folder with a CLIP tokenizer "
                             "(--tokenizer DIR, e.g. the tokenizer/ folder of any SD 1.x diffusers model).") from None
