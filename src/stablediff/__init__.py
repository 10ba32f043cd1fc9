"""stablediff: Stable Diffusion training, fine-tuning and inference that never loses work."""

from stablediff.version import __version__

__all__ = ["__version__"]

import logging as _logging

# diffusers imports bitsandbytes (a dependency, for train.optimizer adamw8bit) whenever it loads a model;
# on CPUs with AVX512-BF16 that import warns about a 4-bit matmul kernel package we never use.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

# The inference API imports torch and diffusers; `import stablediff` stays light and loads it on first use.
_LAZY = {"load_pipeline": "stablediff.inference.api", "save_png": "stablediff.inference.api",
         "release_pipeline": "stablediff.inference.api"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stablediff' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
