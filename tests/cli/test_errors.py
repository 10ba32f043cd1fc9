"""The error policy: the user's mistakes are one paragraph and exit 1; anything else is a bug with its traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import click
import pytest

from stablediff.cli.errors import EX_SOFTWARE, run_cli
from stablediff.errors import GenerationError, UserError
from tests.conftest import REPO, run_cli as run_stablediff

# A command whose body makes torch itself raise ValueError (interpolate refuses size and scale_factor together).
TORCH_VALUE_ERROR = textwrap.dedent("""
    import click, torch
    from stablediff.cli.errors import run_cli

    @click.group()
    def group():
        pass

    @group.command()
    def resize():
        torch.nn.functional.interpolate(torch.zeros(1, 1, 2, 2), size=(4, 4), scale_factor=2.0)

    run_cli(group)
""")


def _group(body) -> click.Group:
    @click.group()
    @click.option("--debug", is_flag=True)
    def group(debug: bool) -> None:
        pass

    @group.command()
    def go() -> None:
        body()

    return group


def _run(group: click.Group, monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["stablediff", *args, "go"])
    with pytest.raises(SystemExit) as exited:
        run_cli(group)
    return exited.value.code


def test_a_value_error_raised_inside_torch_is_shown_as_a_bug():
    result = subprocess.run([sys.executable, "-c", TORCH_VALUE_ERROR, "resize"], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == EX_SOFTWARE == 70
    assert "Traceback (most recent call last)" in result.stderr
    assert "ValueError: only one of size or scale_factor should be defined" in result.stderr
    report = result.stderr.strip().splitlines()[-1]
    assert "bug in stablediff" in report and "stablediff --version" in report and "traceback" in report
    assert "(stablediff resize)" in report  # the command line to put in the report


def test_a_bad_config_key_is_one_paragraph_and_exit_1(tmp_path):
    result = run_stablediff("train", "tiny", "--set", "train.no_such_key=1", "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "bug in stablediff" not in result.stderr
    assert result.stderr.startswith("error: unknown config key 'train.no_such_key'")
    assert "\n\n" not in result.stderr.strip()  # one paragraph


def test_a_user_error_raised_in_the_library_reaches_the_user_as_one_paragraph(monkeypatch, capsys):
    from stablediff.inference.request import check_size_limit

    assert _run(_group(lambda: check_size_limit((8192, 64))), monkeypatch) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: size 8192x64 is past the limit of 4096 pixels a side")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_an_os_error_from_the_environment_is_one_paragraph(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "gone.txt"
    assert _run(_group(missing.read_text), monkeypatch) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: [Errno 2] No such file or directory") and "Traceback" not in err


def test_debug_re_raises_a_user_error_with_its_traceback(monkeypatch):
    def refuse() -> None:
        raise GenerationError("strength 2 is outside (0, 1]")

    monkeypatch.setattr(sys, "argv", ["stablediff", "--debug", "go"])
    with pytest.raises(GenerationError, match="strength 2"):
        run_cli(_group(refuse))


def test_a_plain_value_error_of_ours_is_a_bug(monkeypatch, capsys):
    def broken_invariant() -> None:
        raise ValueError("3 keys for 2 images")

    assert _run(_group(broken_invariant), monkeypatch) == EX_SOFTWARE
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: 3 keys for 2 images" in err and "bug in stablediff" in err


@pytest.mark.parametrize("name", ["ConfigError", "DataError", "CheckpointError", "ModelFileError", "GenerationError",
                                  "MissingPathError", "PathExistsError", "NotAFolderError"])
def test_every_member_of_the_family_is_a_user_error(name):
    import stablediff.errors

    assert issubclass(getattr(stablediff.errors, name), UserError)


@pytest.mark.parametrize("path", ["stablediff.data.sources.base:SourceError", "stablediff.data.feature_shards:FeatureCacheError",
                                  "stablediff.training.resume_check:ConfigChangeRefused",
                                  "stablediff.training.unet_stage:TrainingDiverged",
                                  "stablediff.checkpoint.lock:RunDirInUse",
                                  "stablediff.io.pickle_guard:PickleRefusedError",
                                  "stablediff.models.atomic_output:ExportWriteError"])
def test_our_named_errors_are_user_errors(path):
    import importlib

    module, name = path.split(":")
    assert issubclass(getattr(importlib.import_module(module), name), UserError)
