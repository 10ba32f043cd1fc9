"""Inception features for FID and KID, comparable with published (clean-fid) numbers.

Two things decide whether an FID can be compared with a paper's: the network's weights and
how images reach 299x299. The weights are the TF Inception graph of 2015-12-05; the user
provides them as a local file, never downloaded, never unpickled:
- clean-fid's / NVlabs' TorchScript archive `inception-2015-12-05.pt` (loaded by torch.jit.load,
  which reads tensors and TorchScript code, not Python pickles), or
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` converted once to `.safetensors`,
  loaded into our own network (inception_net.FIDInceptionV3) key for key.
The resize is clean-fid's "clean" mode: each channel as a float32 PIL image, bicubic, no
rounding back to uint8 (clean-fid's README: FFHQ resized by a non-PIL bicubic scores FID 6 or
more against PIL-resized copies of the same images).
Pixels then map to [-1, 1] by (x - 128) / 128, the TF graph's own Sub/Mul and what clean-fid
feeds the archive's layers (pytorch-fid's 2x/255 - 1 differs by ~0.4%).
"""

from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass

import blake3
import numpy as np
import torch
from PIL import Image

from stablediff.errors import MissingPathError, ModelFileError
from stablediff.evaluation.inception_net import FEATURE_DIM, FIDInceptionV3
from stablediff.io.pickle_guard import PICKLE_SUFFIXES, sniff_format

INPUT_SIZE = 299
TORCHSCRIPT_NAME = "inception-2015-12-05.pt"
PYTORCH_FID_NAME = "pt_inception-2015-12-05-6726825d.pth"
CONVERT_COMMAND = (
    "python -c \"import torch, safetensors.torch as st; "
    f"st.save_file({{k: v.contiguous() for k, v in torch.load('{PYTORCH_FID_NAME}', weights_only=True).items()}}, "
    "'pt_inception-2015-12-05.safetensors')\""
)
WHAT_TO_PROVIDE = (
    f"Provide the standard FID Inception weights as a local file: clean-fid's / NVlabs' TorchScript "
    f"archive {TORCHSCRIPT_NAME}, or pytorch-fid's {PYTORCH_FID_NAME} converted once to safetensors "
    f"with {CONVERT_COMMAND} (stablediff downloads nothing and never unpickles weights)."
)
# BatchNorm's step counter: in our state dict, maybe not in the file, never used in eval mode.
_OPTIONAL_SUFFIX = ".num_batches_tracked"


def clean_resize(image: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """clean-fid's "clean" resize: (H, W, C) uint8 -> (size, size, C) float32 in the 0..255 range.

    Each channel goes through PIL's bicubic filter as a float ('F' mode) image, so nothing is
    rounded or clipped: bicubic overshoot just past 0 or 255 is kept, as clean-fid keeps it.
    """
    channels = []
    for c in range(image.shape[2]):
        plane = Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32))  # a float32 array: mode 'F'
        channels.append(np.asarray(plane.resize((size, size), Image.BICUBIC)))
    return np.stack(channels, axis=2)


@dataclass
class InceptionModel:
    """Loaded FID Inception weights: `pool_features` maps (B, 3, 299, 299) 0..255 floats to (B, 2048)."""

    path: str
    kind: str  # "safetensors" or "torchscript"
    module: torch.nn.Module
    fingerprint: str  # BLAKE3 of the file: what a cached score was computed with

    def to(self, device: torch.device | str) -> InceptionModel:
        self.module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        param = next(iter(self.module.parameters()), None)
        return param.device if param is not None else torch.device("cpu")

    def pool_features(self, batch: torch.Tensor) -> torch.Tensor:
        scaled = (batch - 128.0) / 128.0
        if self.kind == "safetensors":
            return self.module(scaled)
        with torch.jit.optimized_execution(False):  # run the graph as written, no profiling/fusion passes
            return self._archive_features(batch, scaled)

    def _archive_features(self, batch: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
        layers = getattr(self.module, "layers", None)
        if layers is not None:  # NVlabs' archive: its layers take [-1, 1] at 299, as clean-fid calls them
            return layers(scaled).reshape(batch.shape[0], -1)
        # Another archive with the StyleGAN detector's signature: 0..255 images in, features with return_features.
        return self.module(batch, return_features=True).reshape(batch.shape[0], -1)


def load_inception(path: str | os.PathLike | None) -> InceptionModel:
    """Load the FID Inception from a .safetensors state dict or a TorchScript archive, in eval mode."""
    if path is None:
        raise ModelFileError(f"Inception features need the FID Inception weights; none were given. {WHAT_TO_PROVIDE}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingPathError(f"The Inception weights file {path} does not exist. {WHAT_TO_PROVIDE}")
    kind = _file_kind(path)
    module = _load_safetensors(path) if kind == "safetensors" else _load_torchscript(path)
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return InceptionModel(path=path, kind=kind, module=module, fingerprint=_file_fingerprint(path))


def _file_kind(path: str) -> str:
    with open(path, "rb") as f:
        kind = sniff_format(f.read(16))
    if kind == "safetensors":
        return "safetensors"
    if kind == "zip" and _is_torchscript_archive(path):
        return "torchscript"
    if kind in ("zip", "pickle") or path.lower().endswith(PICKLE_SUFFIXES):
        raise ModelFileError(
            f"{path} is a pickle ({kind} format), not a TorchScript archive: loading it would run "
            f"whatever code the file holds, so stablediff does not. {WHAT_TO_PROVIDE}"
        )
    raise ModelFileError(f"{path} is neither a safetensors file nor a TorchScript archive. {WHAT_TO_PROVIDE}")


def _is_torchscript_archive(path: str) -> bool:
    # torch.jit.save's zip holds the model's TorchScript source under <archive>/code/;
    # a torch.save zip holds only data.pkl and tensor blobs.
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def _load_torchscript(path: str) -> torch.nn.Module:
    try:
        with warnings.catch_warnings():
            # torch marks TorchScript deprecated; the standard archive exists only in that format.
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(path, map_location="cpu")
    except RuntimeError as error:
        raise ModelFileError(
            f"{path} could not be read as a TorchScript archive ({str(error).splitlines()[0]}). {WHAT_TO_PROVIDE}"
        ) from error


def _load_safetensors(path: str) -> FIDInceptionV3:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except SafetensorError as error:
        raise ModelFileError(f"{path} is not a readable safetensors file ({error}). {WHAT_TO_PROVIDE}") from error
    with torch.device("meta"):  # shapes only: every tensor comes from the file
        net = FIDInceptionV3()
    expected = net.state_dict()
    problems = state_dict_problems(expected, state)
    if problems:
        raise ModelFileError(f"{path} is not the FID Inception-v3 state dict: {problems}. {WHAT_TO_PROVIDE}")
    full = {key: state[key].to(ref.dtype) if key in state else torch.zeros((), dtype=ref.dtype)
            for key, ref in expected.items()}
    net.load_state_dict(full, strict=True, assign=True)
    return net


def state_dict_problems(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """What keeps `found` from loading strictly into a net whose state dict is `expected`; '' if nothing."""
    required = {key for key in expected if not key.endswith(_OPTIONAL_SUFFIX)}
    missing = sorted(required - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    reshaped = sorted(
        f"{key} {tuple(found[key].shape)} instead of {tuple(expected[key].shape)}"
        for key in found.keys() & required
        if found[key].shape != expected[key].shape
    )
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", reshaped)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            parts.append(f"{len(keys)} {label} ({shown})")
    return "; ".join(parts)


def _file_fingerprint(path: str) -> str:
    hasher = blake3.blake3()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def features(images: np.ndarray, model: InceptionModel, batch_size: int = 32) -> np.ndarray:
    """(N, H, W, 3) uint8 images -> (N, 2048) float64 Inception pool features, on the model's device.

    Deterministic: eval mode, no gradients, cuDNN's deterministic kernels and no TF32, so the same
    images give the same features each time (and on a GPU, full float32 convolutions).
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 images, got {images.dtype} {images.shape}")
    device = model.device
    model.module.eval()
    out = np.empty((len(images), FEATURE_DIM), dtype=np.float64)
    with torch.no_grad(), torch.backends.cudnn.flags(
        enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True, allow_tf32=False
    ):
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = torch.from_numpy(np.stack([clean_resize(image) for image in chunk])).permute(0, 3, 1, 2)
            pooled = model.pool_features(batch.contiguous().to(device))  # (B, 2048)
            if pooled.shape != (len(chunk), FEATURE_DIM):
                raise ModelFileError(
                    f"{model.path} returned features of shape {tuple(pooled.shape)} for {len(chunk)} images, "
                    f"not ({len(chunk)}, {FEATURE_DIM}): it is not the FID Inception. {WHAT_TO_PROVIDE}"
                )
            out[start : start + len(chunk)] = pooled.double().cpu().numpy()
    return out
