"""What one generation call asks for, and its round trip through infotext.

One image's infotext holds everything that decides its pixels (prompt,
negative prompt, steps, sampler, CFG scale, its own seed, size, denoising
strength, LoRA weights) plus which model, LoRA and embedding files made it (by hash;
embeddings as A1111's `TI hashes`),
so `request_from_infotext` gives back a request that re-creates that image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from stablediff.errors import GenerationError
from stablediff.inference.embeddings import EmbeddingSpec
from stablediff.inference.lora import LoraSpec
from stablediff.inference.metadata import Infotext, infotext
from stablediff.inference.schedulers import DEFAULT_SAMPLER, get_sampler, sampler_from_infotext


# Past this a side is a typo, not a picture: SD 1.x makes 512, SDXL 1024, and a 4096x4096 image already
# takes minutes and many GB of activations.
MAX_SIDE = 4096


def check_size_limit(size: tuple[int, int]) -> None:
    width, height = size
    if max(width, height) > MAX_SIDE:
        raise GenerationError(f"size {width}x{height} is past the limit of {MAX_SIDE} pixels a side; Stable Diffusion "
                              "1.x models make 512x512 and SDXL 1024x1024 (generate smaller and upscale instead)")


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str | None = None
    steps: int = 20
    sampler: str = DEFAULT_SAMPLER
    guidance_scale: float = 3.0
    seed: int = 0
    num: int = 1
    size: tuple[int, int] | None = None  # (width, height); None: the model's own (or the init image's)
    strength: float | None = None  # img2img / inpainting only
    loras: tuple[LoraSpec, ...] = ()
    embeddings: tuple[EmbeddingSpec, ...] = ()  # textual inversion; a prompt word is a file's name stem

    def __post_init__(self) -> None:
        get_sampler(self.sampler)  # an unknown name fails here, listing the valid ones
        if self.size is not None:
            check_size_limit(self.size)
        if self.steps < 1 or self.num < 1 or self.seed < 0:
            raise GenerationError(f"steps ({self.steps}) and num ({self.num}) must be at least 1 and seed ({self.seed}) "
                                  "at least 0")

    def for_image(self, index: int, size: tuple[int, int]) -> "GenerationRequest":
        """The request that makes image `index` of this call alone (A1111 seeds: seed + index)."""
        return replace(self, seed=self.seed + index, num=1, size=size)


def infotext_for(request: GenerationRequest, model_name: str, model_hash: str,
                 lora_hashes: dict[str, str], embedding_hashes: dict[str, str] | None = None) -> str:
    """A1111 infotext of a single-image request (see `GenerationRequest.for_image`)."""
    width, height = request.size
    params = {
        "Steps": request.steps, "Sampler": request.sampler, "CFG scale": request.guidance_scale,
        "Seed": request.seed, "Size": f"{width}x{height}", "Model hash": model_hash, "Model": model_name,
        "Denoising strength": request.strength,
    }
    if request.loras:
        params["Lora hashes"] = ", ".join(f"{spec.name}: {lora_hashes[spec.name]}" for spec in request.loras)
        params["Lora weights"] = ", ".join(f"{spec.name}: {spec.scale}" for spec in request.loras)
    if request.embeddings:
        params["TI hashes"] = ", ".join(f"{spec.name}: {(embedding_hashes or {})[spec.name]}"
                                        for spec in request.embeddings)
    return infotext(request.prompt, request.negative_prompt, params)


def request_from_infotext(info: Infotext, loras: tuple[LoraSpec, ...] = (),
                          embeddings: tuple[EmbeddingSpec, ...] = ()) -> GenerationRequest:
    """The request an infotext describes; `loras` and `embeddings` are the files it names (see
    `lora_weights`, `embedding_hashes`)."""
    params = info.params
    try:
        width, height = (int(v) for v in params["Size"].lower().split("x"))
        strength = params.get("Denoising strength")
        return GenerationRequest(
            prompt=info.prompt, negative_prompt=info.negative_prompt, steps=int(params["Steps"]),
            sampler=sampler_from_infotext(params.get("Sampler", DEFAULT_SAMPLER), params.get("Schedule type")),
            guidance_scale=float(params["CFG scale"]),
            seed=int(params["Seed"]), size=(width, height), strength=float(strength) if strength else None,
            loras=loras, embeddings=embeddings,
        )
    except (KeyError, ValueError) as exc:
        raise GenerationError(f"the image's parameters cannot be read back ({type(exc).__name__}: {exc}); they need "
                              "at least Steps, CFG scale, Seed and Size, with a sampler stablediff knows") from None


def lora_weights(info: Infotext) -> dict[str, tuple[str, float]]:
    """name -> (short hash, scale) of the LoRAs an infotext names."""
    hashes = _name_values(info.params.get("Lora hashes", ""))
    scales = _name_values(info.params.get("Lora weights", ""))
    return {name: (hash_, float(scales.get(name, 1.0))) for name, hash_ in hashes.items()}


def embedding_hashes(info: Infotext) -> dict[str, str]:
    """name -> short hash of the embeddings an infotext names (A1111's `TI hashes`)."""
    return _name_values(info.params.get("TI hashes", ""))


def _name_values(text: str) -> dict[str, str]:
    pairs = (item.rpartition(":") for item in text.split(",") if item.strip())
    return {name.strip(): value.strip() for name, _, value in pairs}
