"""Tensors to raw little-endian bytes and back, without pickle and without numpy bf16.

torch is imported only when a torch tensor is actually involved, so that
`ckpt list`, `ckpt verify` and the crash-test writer start in a fraction of a
second instead of paying for `import torch`.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .errors import CheckpointError

# dtype name in the manifest -> bytes per element.
DTYPE_SIZES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}

if sys.byteorder != "little":  # every manifest is little-endian by definition
    raise ImportError("stablediff checkpoints need a little-endian machine")


def _torch_if_loaded() -> Any:
    # A torch.Tensor can only exist if torch has been imported already.
    return sys.modules.get("torch")


def is_torch_tensor(value: Any) -> bool:
    torch = _torch_if_loaded()
    return torch is not None and isinstance(value, torch.Tensor)


def tensor_bytes(name: str, value: Any) -> tuple[str, tuple[int, ...], memoryview]:
    """(dtype name, shape, flat uint8 view of the data) for a numpy array or torch tensor.

    The view aliases the tensor when it is already a contiguous CPU tensor, so
    callers must not mutate the tensor while they still use the view.
    """
    if is_torch_tensor(value):
        return _torch_bytes(name, value)
    if isinstance(value, np.ndarray):
        return _numpy_bytes(name, value)
    raise CheckpointError(
        f"tensor '{name}' is a {type(value).__name__}; a checkpoint takes numpy arrays or "
        f"torch tensors only (put plain Python values into `meta`)"
    )


def _numpy_bytes(name: str, array: np.ndarray) -> tuple[str, tuple[int, ...], memoryview]:
    dtype = array.dtype
    if dtype.name not in DTYPE_SIZES or dtype.byteorder == ">":
        raise CheckpointError(
            f"tensor '{name}' has dtype {dtype}; supported: {', '.join(DTYPE_SIZES)} "
            f"(little-endian). Convert it with .astype(...) before saving."
        )
    array = np.ascontiguousarray(array)
    return dtype.name, tuple(array.shape), memoryview(array.reshape(-1).view(np.uint8))


def _torch_bytes(name: str, tensor: Any) -> tuple[str, tuple[int, ...], memoryview]:
    torch = _torch_if_loaded()
    dtype_name = str(tensor.dtype).removeprefix("torch.")
    if dtype_name not in DTYPE_SIZES:
        raise CheckpointError(
            f"tensor '{name}' has dtype {tensor.dtype}; supported: {', '.join(DTYPE_SIZES)}. "
            f"Convert it with .to(...) before saving."
        )
    shape = tuple(tensor.shape)
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if dtype_name == "bfloat16":  # numpy has no bf16: move the same 16 bits as int16
        flat = flat.view(torch.int16)
    return dtype_name, shape, memoryview(flat.numpy().view(np.uint8))


def empty_bytes(nbytes: int) -> Any:
    """A flat uint8 CPU tensor to read `nbytes` of raw data into."""
    import torch

    return torch.empty(nbytes, dtype=torch.uint8)


def as_torch(raw: Any, dtype_name: str, shape: list[int], device: str) -> Any:
    """Reinterpret the flat uint8 tensor `raw` as the stored dtype and shape."""
    import torch

    dtype = getattr(torch, dtype_name)
    if raw.numel() == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    return raw.view(dtype).reshape(shape).to(device)


def nbytes_of(dtype_name: str, shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * DTYPE_SIZES[dtype_name]
