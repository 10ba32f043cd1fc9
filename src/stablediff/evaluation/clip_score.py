"""CLIP score: how well images match their prompts, as judged by a CLIP model the user has locally.

torchmetrics' definition (Hessel et al. 2021, "CLIPScore", without their 2.5 weight):
score(image, prompt) = max(100 * cos(E_image, E_text), 0), reported as the mean over the
images with its standard deviation and the count. It measures prompt adherence in CLIP's
eyes, not image quality; per-image scores are noisy, so a mean means little below a few
thousand prompts (SimpleTuner's docs suggest ~5,000, e.g. Parti Prompts).

The model is a transformers `CLIPModel` folder as `save_pretrained` writes it (for
instance a local copy of openai/clip-vit-large-patch14); nothing is downloaded and
pickle weights are refused unless trusted. Prompts longer than the text encoder's
positions (77 tokens for CLIP) are truncated by the tokenizer, which keeps the
end-of-text token that CLIP pools, and a TruncatedPromptWarning says so.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stablediff.errors import ModelFileError
from stablediff.inference.prompts import TruncatedPromptWarning, truncation_message
from stablediff.models.quiet import quiet_hf_libraries
from stablediff.models.weights_guard import check_model_folder

WHAT_TO_PROVIDE = (
    "Give a local folder holding a transformers CLIPModel as save_pretrained writes it (for instance a copy of "
    "openai/clip-vit-large-patch14): config.json (model_type \"clip\"), the weights as model.safetensors (or "
    "sharded safetensors with model.safetensors.index.json), the tokenizer (tokenizer.json, or vocab.json and "
    "merges.txt, with tokenizer_config.json) and the image preprocessor (preprocessor_config.json). Nothing is "
    "downloaded.")


def clip_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(N,) float64 max(100 * cos(image_i, text_i), 0) for paired (N, D) embeddings (any scale)."""
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(f"paired embeddings must have equal (N, D) shapes, got {tuple(image_embeds.shape)} "
                         f"and {tuple(text_embeds.shape)}")
    cosine = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return (100.0 * cosine).clamp(min=0.0)


@dataclass(frozen=True)
class ClipScoreResult:
    mean: float
    std: float  # sample standard deviation of the per-image scores (0 for one image)
    count: int
    scores: tuple[float, ...]  # per image, in the order given
    truncated: int  # prompts cut to the text encoder's length

    def to_json(self) -> dict:
        return {"value": self.mean, "spread": self.std, "count": self.count, "truncated_prompts": self.truncated}


def summarise(scores: torch.Tensor, truncated: int = 0) -> ClipScoreResult:
    values = scores.double().cpu().numpy()
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return ClipScoreResult(float(values.mean()) if len(values) else 0.0, std, len(values),
                           tuple(float(v) for v in values), truncated)


@dataclass
class ClipScorer:
    """A loaded CLIP model, tokenizer and image preprocessor; `score` pairs images with prompts."""

    model: object  # transformers.CLIPModel, eval mode, no gradients
    tokenizer: object
    image_processor: object
    max_length: int  # tokens the text encoder reads, special tokens included
    folder: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(self, images, prompts: Sequence[str], batch_size: int = 32) -> ClipScoreResult:
        """CLIP score of image i against prompt i; images are PIL images or an (N, H, W, 3) uint8 array."""
        images = _as_pil_list(images)
        prompts = list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images and {len(prompts)} prompts: the CLIP score pairs them one to one")
        truncated = self.warn_truncated(prompts)
        scores = [clip_scores(*self.embed(images[i:i + batch_size], prompts[i:i + batch_size]))
                  for i in range(0, len(images), batch_size)]
        return summarise(torch.cat(scores) if scores else torch.zeros(0), truncated)

    @torch.no_grad()
    def embed(self, images: list[Image.Image], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) image and text embeddings in CLIP's joint space (projected, not normalised)."""
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        device = self.device
        image_embeds = self.model.get_image_features(pixel_values=pixels.to(device))
        text_embeds = self.model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                   attention_mask=tokens["attention_mask"].to(device))
        return _pooled(image_embeds), _pooled(text_embeds)

    def warn_truncated(self, prompts: list[str]) -> int:
        """One TruncatedPromptWarning for the prompts past the text encoder's limit; their count."""
        messages = [m for m in (truncation_message(self.tokenizer, p, "CLIP score prompt") for p in prompts) if m]
        if messages:
            warnings.warn(f"{len(messages)} of {len(prompts)} prompts are truncated for the CLIP score; the first: "
                          f"{messages[0]}", TruncatedPromptWarning, stacklevel=3)
        return len(messages)


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _as_pil_list(images) -> list[Image.Image]:
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        return [Image.fromarray(image) for image in images]
    return [image.convert("RGB") for image in images]


def load_clip(folder: str | Path, *, trust_pickle: bool = False, device: str | torch.device | None = None) -> ClipScorer:
    """Load a CLIP model folder for scoring; a missing or wrong folder raises ModelFileError saying what to give."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    folder = check_clip_folder(Path(folder), trust_pickle)
    try:
        with quiet_hf_libraries():
            model, loading = CLIPModel.from_pretrained(folder, local_files_only=True, output_loading_info=True,
                                                       use_safetensors=None if trust_pickle else True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            # The PIL backend: no torchvision needed, and the resizing CLIP's own preprocessing used.
            image_processor = CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFileError(f"the CLIP model folder {folder} could not be loaded ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}). {WHAT_TO_PROVIDE}") from exc
    if loading["missing_keys"]:  # transformers would fill them with random numbers: a score of noise
        missing = sorted(loading["missing_keys"])
        raise ModelFileError(f"the weights in {folder} lack {len(missing)} of the CLIPModel's tensors (such as "
                             f"{', '.join(missing[:3])}): they are not a whole CLIPModel. {WHAT_TO_PROVIDE}")
    max_length = min(int(model.config.text_config.max_position_embeddings), int(tokenizer.model_max_length))
    tokenizer.model_max_length = max_length  # what truncation_message reads
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return ClipScorer(model, tokenizer, image_processor, max_length, folder)


def check_clip_folder(folder: Path, trust_pickle: bool) -> Path:
    """The folder, if it looks like a CLIPModel folder; else one ModelFileError naming every missing part."""
    if not folder.is_dir():
        raise ModelFileError(f"the CLIP model folder {folder} {'is a file' if folder.exists() else 'does not exist'}. "
                             f"{WHAT_TO_PROVIDE}")
    check_model_folder(folder, trust_pickle)  # pickle weights: refused, naming the file and --trust-pickle
    problems = []
    model_type = _model_type(folder / "config.json")
    if model_type != "clip":
        problems.append("no config.json" if model_type is None else f"config.json is a {model_type!r} model")
    weights = list(folder.glob("*.safetensors")) + (list(folder.glob("*.bin")) if trust_pickle else [])
    if not weights:
        problems.append("no model weights (*.safetensors)")
    if not (folder / "tokenizer.json").is_file() and not all((folder / f).is_file() for f in ("vocab.json",
                                                                                                  "merges.txt")):
        problems.append("no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    if not (folder / "preprocessor_config.json").is_file():
        problems.append("no preprocessor_config.json")
    if problems:
        raise ModelFileError(f"{folder} is not a CLIP model folder: {'; '.join(problems)}. {WHAT_TO_PROVIDE}")
    return folder


def _model_type(config_path: Path) -> str | None:
    """config.json's model_type; None without a config.json; a note in its place when it is not JSON."""
    if not config_path.is_file():
        return None
    try:
        return str(json.loads(config_path.read_text()).get("model_type"))
    except (ValueError, AttributeError):
        return "<unreadable config.json>"
