from __future__ import annotations

import pytest

from .corpus import FORMATS, build_corpus


@pytest.fixture(scope="session")
def corpus_specs(tmp_path_factory) -> dict[str, str]:
    """The test corpus written once in every source format: format -> source spec."""
    root = tmp_path_factory.mktemp("corpus")
    return {fmt: build_corpus(root / fmt, fmt) for fmt in FORMATS}
