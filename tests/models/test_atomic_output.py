"""models/atomic_output.py on real files: leftovers, folder swaps, and what a failed write says."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors import SafetensorError

from stablediff.models.atomic_output import ExportWriteError, clean_leftovers, folder, write_error, write_file


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_writers_and_old_hidden_temps_are_removed_live_ones_kept(tmp_path):
    out = tmp_path / "model.safetensors"
    dead = tmp_path / f"model.safetensors.tmp-{dead_pid()}-0a1b2c3d"
    dead_folder = tmp_path / f"model.safetensors.tmp-{dead_pid()}-00ff00ff"
    hidden = tmp_path / ".model.safetensors.k2j4h5.tmp"  # what older versions' mkstemp left
    live = tmp_path / f"model.safetensors.tmp-{os.getppid()}-12345678"  # a process still writing
    other = tmp_path / f"other.safetensors.tmp-{dead_pid()}-0a1b2c3d"
    for path in (dead, hidden, live, other, out):
        path.write_bytes(b"x")
    dead_folder.mkdir()
    (dead_folder / "unet").mkdir()
    assert sorted(clean_leftovers(out)) == sorted([dead, dead_folder, hidden])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name, other.name])


def test_write_file_replaces_at_the_rename_and_leaves_no_temp(tmp_path):
    out = tmp_path / "sub" / "model.safetensors"
    write_file(out, b"old")
    write_file(out, b"new")
    assert out.read_bytes() == b"new" and [p.name for p in out.parent.iterdir()] == [out.name]


def test_a_failed_folder_write_keeps_the_old_folder_and_removes_the_temp(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights").write_text("old")
    with pytest.raises(ExportWriteError, match="No space left on device .errno 28.. Nothing was replaced: .* is as"):
        with folder(out, replace=True) as tmp:
            (tmp / "weights").write_text("half")
            raise OSError(28, "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (out / "weights").read_text() == "old"


def test_a_folder_replaces_the_old_one_whole(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale-file").write_text("old")
    with folder(out, replace=True) as tmp:
        (tmp / "weights").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in out.iterdir()] == ["weights"]


def test_a_folder_never_replaces_without_being_asked(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(FileExistsError, match="--force"):
        with folder(tmp_path / "model", replace=False):
            pass


def test_a_safetensors_io_error_is_told_by_its_errno_in_words(tmp_path):
    raised = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    error = write_error(tmp_path / "m.safetensors", raised, existed=False)
    assert str(error).startswith(f"could not write {tmp_path / 'm.safetensors'}: No space left on device (errno 28)")
    assert "free some space" in str(error) and error.errno == 28
