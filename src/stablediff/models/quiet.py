"""Quiet transformers and diffusers for the duration of a load, then put their settings back.

Loading bars and notices such as "expected CLIPTextModel" (for our BERT text
encoder) are noise to a user; but a library must not change process-wide
state behind its caller's back, so the levels are restored on the way out.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def quiet_hf_libraries() -> Iterator[None]:
    """transformers' and diffusers' logging at ERROR and their progress bars off, inside the block only."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (hf_logging, diffusers_logging)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            (lib.enable_progress_bar if bars else lib.disable_progress_bar)()
