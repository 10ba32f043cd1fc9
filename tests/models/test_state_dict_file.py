"""Reading model files never unpickles an untrusted file, whatever its name."""

from __future__ import annotations

import pickle

import pytest

from stablediff.io.pickle_guard import PickleRefusedError
from stablediff.models.state_dict_file import read_model_file


class _Payload:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this creates the marker file: "code ran"
        return (open, (self.marker, "w"))


def test_an_untrusted_protocol_0_pickle_is_refused_before_any_code_runs(tmp_path):
    marker = tmp_path / "code-ran"
    model = tmp_path / "model.weights"
    model.write_bytes(pickle.dumps(_Payload(marker), protocol=0))
    with pytest.raises(PickleRefusedError, match="--trust-pickle"):
        read_model_file(model)
    assert not marker.exists()
