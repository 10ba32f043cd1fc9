"""Pre-flight: a bad data.source or data.validation_source is refused before any work, naming the key."""

import pytest

from stablediff.cli.preflight import check_run_inputs
from stablediff.config import load_config
from stablediff.errors import UserError


@pytest.mark.parametrize(("key", "spec", "what"), [
    ("data.source", "builtin:digits?digits=0-10", "'0-10' is outside 0-9"),
    ("data.source", "builtin:digits?digits=9&count=1000", "count=1000 asks for more"),
    ("data.validation_source", "builtin:digits:held_out?colour=red", "unknown selector key 'colour'"),
    ("data.validation_source", "/nonexistent/validation/images", "does not exist"),
])
def test_a_source_that_does_not_open_is_refused_naming_its_key(tmp_path, key, spec, what):
    config = load_config("tiny", [f"{key}={spec}"])
    with pytest.raises(UserError) as raised:
        check_run_inputs(config, tmp_path / "run")
    assert what in str(raised.value) and f"fix {key}" in str(raised.value)
    assert not (tmp_path / "run").exists()


def test_a_selection_and_a_validation_folder_pass(tmp_path):
    (tmp_path / "val").mkdir()
    config = load_config("tiny", ["data.source=builtin:digits?digits=9&count=20",
                                  f"data.validation_source={tmp_path / 'val'}"])
    check_run_inputs(config, tmp_path / "run")
