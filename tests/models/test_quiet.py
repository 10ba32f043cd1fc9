from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as hf_logging

from stablediff.models.quiet import quiet_hf_libraries


def test_quiet_inside_the_block_and_restored_after_it():
    hf_logging.set_verbosity_info()
    diffusers_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()
    try:
        with quiet_hf_libraries():
            assert hf_logging.get_verbosity() == hf_logging.ERROR
            assert diffusers_logging.get_verbosity() == diffusers_logging.ERROR
            assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == hf_logging.INFO
        assert diffusers_logging.get_verbosity() == diffusers_logging.WARNING
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity_warning()


def test_restored_when_the_block_raises():
    hf_logging.set_verbosity_warning()
    try:
        with quiet_hf_libraries():
            raise KeyError("boom")
    except KeyError:
        pass
    assert hf_logging.get_verbosity() == hf_logging.WARNING
