"""The Python API: `load_pipeline(MODEL)` and its txt2img / img2img / inpaint.

    import stablediff
    model = stablediff.load_pipeline("runs/digits")
    images = model.txt2img("a handwritten digit seven", steps=20, seed=1, num=4)
    stablediff.save_png(images[0], "seven.png")  # with A1111 infotext

The last model loaded stays in memory and is reused while its weights on disk
do not change; loading another releases it first, so switching models never
holds two of them (a caller's own reference still keeps one alive).
"""

from __future__ import annotations

import gc
import json
import threading
import warnings
from dataclasses import replace
from pathlib import Path

from PIL import Image

from stablediff.errors import GenerationError
from stablediff.inference.embeddings import EmbeddingSpec, parse_embedding_arg
from stablediff.inference.lora import LoraSpec, parse_lora_arg
from stablediff.inference.metadata import (LOCATIONS_KEY, PARAMETERS_KEY, file_short_hash, locations_relative_to,
                                          png_info)
from stablediff.inference.prompts import TruncatedPromptWarning
from stablediff.inference.request import GenerationRequest, infotext_for
from stablediff.inference.resolve import ModelSource, load_source, model_hash, resolve_model

DEFAULT_STRENGTH = 0.75  # A1111's default denoising strength


class ImagePipeline:
    """A loaded model. Calls are serialized: sampler, LoRAs and embeddings are set on the shared modules per
    call."""

    def __init__(self, pipe, source: ModelSource, hash_: str):
        self.pipe = pipe  # the diffusers StableDiffusionPipeline
        self.source = source
        self.model_hash = hash_
        self._scheduler_config = dict(pipe.scheduler.config)
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.source.name

    def txt2img(self, prompt: str, **options) -> list[Image.Image]:
        """Options: negative_prompt, steps, sampler, guidance_scale, seed, num, size=(w, h), loras, embeddings
        (embedding files, or EmbeddingSpec(path, trust_pickle=True) for a .pt/.bin one)."""
        return self.generate(_request(prompt, options))

    def img2img(self, prompt: str, init_image, strength: float = DEFAULT_STRENGTH, **options) -> list[Image.Image]:
        """`init_image`: a path or PIL image. Output size: `size`, else the init image's."""
        return self.generate(_request(prompt, {**options, "strength": strength}), init_image=init_image)

    def inpaint(self, prompt: str, init_image, mask, strength: float = DEFAULT_STRENGTH,
                **options) -> list[Image.Image]:
        """`mask`: a path or PIL image; white is redrawn, black kept (pixel for pixel)."""
        return self.generate(_request(prompt, {**options, "strength": strength}), init_image=init_image, mask=mask)

    def prompt_warnings(self, request: GenerationRequest) -> list[str]:
        """What of the prompt and negative prompt the text encoder will not read (see `prompts`), with the
        request's embeddings loaded (a multi-vector one takes several tokens)."""
        from stablediff.inference.embeddings import apply_embeddings
        from stablediff.inference.prompts import truncation_message

        with self._lock:
            apply_embeddings(self.pipe, request.embeddings)
            texts = [(self.pipe.maybe_convert_prompt(text, self.pipe.tokenizer) if text else text, what)
                     for text, what in ((request.prompt, "prompt"), (request.negative_prompt, "negative prompt"))]
            found = [truncation_message(self.pipe.tokenizer, text, what) for text, what in texts]
        return [message for message in found if message]

    def generate(self, request: GenerationRequest, init_image=None, mask=None) -> list[Image.Image]:
        """The images of `request`; a prompt past the text encoder's limit gives a TruncatedPromptWarning."""
        from stablediff.inference import pipeline as sd
        from stablediff.data.transforms import to_rgb
        from stablediff.inference.images import open_init_image, open_mask
        from stablediff.inference.embeddings import apply_embeddings
        from stablediff.inference.lora import apply_loras
        from stablediff.inference.schedulers import make_scheduler

        if mask is not None and init_image is None:
            raise GenerationError("inpainting needs the image to paint into as well as the mask (--init IMG --mask MASK)")
        if init_image is not None and request.strength is None:
            request = replace(request, strength=DEFAULT_STRENGTH)
        for message in self.prompt_warnings(request):
            warnings.warn(message, TruncatedPromptWarning, stacklevel=2)
        with self._lock:
            init = None
            if init_image is not None:
                init = open_init_image(Path(init_image), None) if _is_path(init_image) else to_rgb(init_image)
            size = request.size or (init.size if init is not None else sd.model_default_size(self.pipe))
            sd.check_size(self.pipe, size)
            if mask is not None:
                mask_image = open_mask(Path(mask), init.size, size) if _is_path(mask) else mask
                mask_image = mask_image.convert("L").resize(size, Image.NEAREST)
            if init is not None and init.size != size:
                init = init.resize(size, Image.LANCZOS)
            apply_loras(self.pipe, list(request.loras))
            apply_embeddings(self.pipe, request.embeddings)
            self.pipe.scheduler = make_scheduler(request.sampler, self._scheduler_config, request.steps)
            common = dict(negative_prompt=request.negative_prompt, steps=request.steps,
                          guidance_scale=request.guidance_scale, seed=request.seed, num=request.num)
            if init is None:
                images = sd.txt2img(self.pipe, request.prompt, size=size, **common)
            elif mask is None:
                images = sd.img2img(self.pipe, request.prompt, init, strength=request.strength, **common)
            else:
                images = sd.inpaint(self.pipe, request.prompt, init, mask_image, strength=request.strength, **common)
        return self._annotate(images, request, size, init_image, mask)

    def _annotate(self, images, request, size, init_image, mask) -> list[Image.Image]:
        lora_hashes = {spec.name: file_short_hash(spec.path) for spec in request.loras}
        embedding_hashes = {spec.name: file_short_hash(spec.path) for spec in request.embeddings}
        locations = {"model": str(self.source.path), "step": self.source.step, "best": self.source.best,
                     "loras": {spec.name: str(spec.path) for spec in request.loras}}
        if request.embeddings:
            locations["embeddings"] = {spec.name: str(spec.path) for spec in request.embeddings}
        for key, value in (("init", init_image), ("mask", mask)):
            if value is not None and _is_path(value):
                locations[key] = str(Path(value).resolve())
        for index, image in enumerate(images):
            single = request.for_image(index, size)
            image.info[PARAMETERS_KEY] = infotext_for(single, self.name, self.model_hash, lora_hashes,
                                                      embedding_hashes)
            image.info[LOCATIONS_KEY] = json.dumps(locations, sort_keys=True)
        return images


def _is_path(value) -> bool:
    return isinstance(value, (str, Path))


def _request(prompt: str, options: dict) -> GenerationRequest:
    loras = tuple(_lora_spec(item) for item in options.pop("loras", ()) or ())
    embeddings = tuple(_embedding_spec(item) for item in options.pop("embeddings", ()) or ())
    unknown = set(options) - set(GenerationRequest.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; options are negative_prompt, steps, sampler, "
                        "guidance_scale, seed, num, size, loras, embeddings")
    size = options.get("size")
    return GenerationRequest(prompt=prompt, loras=loras, embeddings=embeddings, **{**options, "size": tuple(size) if size else None})


def _lora_spec(item) -> LoraSpec:
    """A LoraSpec, "path[:scale]", or (path, scale)."""
    if isinstance(item, LoraSpec):
        return item
    if isinstance(item, (tuple, list)):
        return LoraSpec(parse_lora_arg(str(item[0])).path, float(item[1]))
    return parse_lora_arg(str(item))


def _embedding_spec(item) -> EmbeddingSpec:
    """An EmbeddingSpec, or the path of a file (a pickle .pt/.bin one only as EmbeddingSpec(path, True))."""
    return item if isinstance(item, EmbeddingSpec) else parse_embedding_arg(str(item))


def save_png(image: Image.Image, path: str | Path, embed_paths: bool = False) -> Path:
    """Write `image` as PNG with the metadata a generation call attached to it; the files that made it are
    recorded relative to the PNG's folder, or as absolute paths with `embed_paths`."""
    path = Path(path)
    locations = json.loads(image.info.get(LOCATIONS_KEY, "{}"))
    if not embed_paths:
        locations = locations_relative_to(locations, path.parent)
    image.save(path, format="PNG", pnginfo=png_info(image.info.get(PARAMETERS_KEY, ""), locations))
    return path


_cache: dict[tuple, ImagePipeline] = {}
_cache_lock = threading.Lock()


def load_pipeline(model: str | Path, *, step: int | None = None, best: bool = False,
                  trust_pickle: bool = False) -> ImagePipeline:
    """Load MODEL (run directory, diffusers folder or single file), or reuse it if it is the one loaded last."""
    source = resolve_model(model, step, best)
    key = source.cache_key()
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        release_pipeline()
        pipe = load_source(source, trust_pickle)
        loaded = ImagePipeline(pipe, source, model_hash(source, pipe))
        _cache[key] = loaded
        return loaded


def release_pipeline() -> None:
    """Forget the cached model, so its memory is freed once no caller holds it."""
    _cache.clear()
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
