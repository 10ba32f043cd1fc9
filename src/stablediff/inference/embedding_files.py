"""Textual-inversion embedding files: the layouts A1111, ComfyUI and diffusers write and read.

What we write (`save_embedding`) is a safetensors file holding one tensor,
`{token: (num_vectors, width)}`, with the metadata `format: pt`: the layout of
diffusers' `learned_embeds.safetensors`. All three tools read it: A1111 takes
any single-key dict whose value is a tensor, ComfyUI takes the first value of
the dict, diffusers takes the single key as the token (REFERENCE 2.3).

What we read (`read_embedding`):
- safetensors with one tensor (diffusers `{token: t}`, kohya `{"emb_params": t}`,
  ours), or a flattened A1111 `string_to_param.*`;
- pickle `.pt`/`.bin` (A1111's `{"string_to_param": {"*": t}, "name": ...}`,
  diffusers' `learned_embeds.bin`, kohya's `{"emb_params": t}`) only with
  `trust_pickle`, refused otherwise in the pickle guard's words, and even then
  unpickled with `weights_only=True` (tensors and plain containers only);
- SDXL files (`clip_l` + `clip_g`) are refused: they need SDXL's two text encoders.

The word a prompt uses for an embedding is its FILE NAME stem, as in A1111 and
ComfyUI (`ink-style.safetensors` -> `ink-style`), whatever key the file stores.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stablediff.errors import MissingPathError, ModelFileError
from stablediff.io.atomic import replace_atomic
from stablediff.io.pickle_guard import refuse_pickle

if TYPE_CHECKING:  # torch loads on first use: `import stablediff` and the CLI's start stay light
    import torch

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


def embedding_name(path: Path) -> str:
    """The prompt word of an embedding file: its file name stem (A1111's and ComfyUI's rule)."""
    return Path(path).stem


def save_embedding(path: str | Path, token: str, vectors: torch.Tensor,
                   metadata: dict[str, str] | None = None) -> Path:
    """Write `{token: vectors}` (num_vectors, width) as safetensors, atomically; returns the path.

    Name the file after the token (`<dir>/<token>.safetensors`): A1111, ComfyUI and
    `stablediff generate --embedding` use the file name stem as the prompt word."""
    import torch
    from safetensors.torch import save

    path = Path(path)
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise ValueError(f"embedding vectors must be (num_vectors, width), got shape {tuple(vectors.shape)}")
    extra = {str(key): str(value) for key, value in (metadata or {}).items()}
    tensor = vectors.detach().to("cpu", torch.float32).contiguous().clone()
    replace_atomic(path, save({token: tensor}, metadata={**extra, "format": "pt"}))
    return path


def check_embedding_path(path: Path, trust_pickle: bool = False) -> Path:
    """The file, resolved, if it exists, has an embedding suffix and is not a refused pickle."""
    if not path.is_file():
        raise MissingPathError(f"embedding {path} does not exist; give a textual-inversion file (.safetensors, or "
                               "a .pt/.bin with --trust-pickle) as --embedding FILE")
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise ModelFileError(f"embedding {path}: embedding files end in {', '.join(EMBEDDING_SUFFIXES)}; "
                             f"{path.suffix or 'no suffix'} is not one of them")
    refuse_pickle(path, trust_pickle)  # the same refusal, in the same words, as for models
    return path.resolve()


def read_embedding(path: str | Path, trust_pickle: bool = False) -> tuple[str, torch.Tensor]:
    """(prompt word = file name stem, float32 (num_vectors, width) vectors) of an embedding file."""
    import torch

    path = check_embedding_path(Path(path), trust_pickle)
    kind = refuse_pickle(path, trust_pickle)
    data = _read_pickle(path) if kind != "safetensors" else _read_safetensors(path)
    vectors = _vectors_of(data, path)
    if vectors.ndim == 1:  # a single vector saved without its row dimension
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2 or vectors.shape[0] < 1 or not vectors.is_floating_point():
        raise ModelFileError(f"embedding {path} holds a {vectors.dtype} tensor of shape {tuple(vectors.shape)}; an "
                             "embedding is (num_vectors, width) floats")
    return embedding_name(path), vectors.detach().to("cpu", torch.float32)


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise ModelFileError(f"embedding {path} is not a readable safetensors file ({exc}); it may be truncated — "
                             "download or export it again") from None


def _read_pickle(path: Path) -> object:
    import torch

    try:  # trusted by the user, and still no code runs: weights_only reads tensors and plain containers
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure is a bad file, told in one line
        raise ModelFileError(f"embedding {path} could not be read as a PyTorch file ({type(exc).__name__}: {exc}); "
                             "it is damaged or holds more than tensors") from None


def _vectors_of(data: object, path: Path) -> torch.Tensor:
    """The one tensor of a file in any of the layouts in the module docstring."""
    import torch

    if torch.is_tensor(data):
        return data
    if not isinstance(data, dict):
        raise ModelFileError(f"embedding {path} holds a {type(data).__name__}, not a dict of tensors")
    if "string_to_param" in data and isinstance(data["string_to_param"], dict):  # A1111 .pt
        data = data["string_to_param"]
    else:
        flat = {k: v for k, v in data.items() if k.startswith("string_to_param.")}
        data = flat or data
    if {"clip_l", "clip_g"} <= set(data):
        raise ModelFileError(f"embedding {path} is an SDXL embedding (clip_l and clip_g vectors), for SDXL's two "
                             "text encoders; give an embedding trained for Stable Diffusion 1.x/2.x")
    tensors = [value for value in data.values() if torch.is_tensor(value)]
    if len(tensors) != 1:
        keys = ", ".join(sorted(map(str, data))[:6])
        raise ModelFileError(f"embedding {path} holds {len(tensors)} tensors (keys: {keys}); a textual-inversion "
                             "embedding file holds exactly one (e.g. {token: tensor} or emb_params)")
    return tensors[0]
