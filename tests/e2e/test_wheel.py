"""`pip install .` gives a working stablediff: the wheel, in a fresh venv, runs from any directory.

Offline: the wheel is built without build isolation (setuptools from the running
environment) and installed without dependencies; the new venv sees the running
environment's installed packages through a `.pth` path line. Path lines only
extend sys.path, so the `.pth` files there (the checkout's editable install among
them) are not run, and `import stablediff` can only find the wheel's copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "src")
# Small and single-threaded, as the other e2e runs of `train tiny`.
TRAIN_TINY = ["train", "tiny", "--run-dir", "runs/x", "--set", "train.threads=1", "--set", "train.tensorboard=false"]


def clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH: a test run's `src/` must not leak into the new venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def build_wheel(tmp: Path) -> Path:
    """A non-editable wheel built from a copy of the sources.

    A build in the checkout would leave build/ there, and a stale build/lib can put
    modules deleted since into the wheel.
    """
    source = tmp / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, source / name)
    # --check-build-dependencies: without isolation, the running setuptools must still meet pyproject's bound.
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation",
         "--check-build-dependencies", "-w", str(tmp / "dist"), str(source)], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("stablediff-*.whl")
    return wheel


def make_venv(venv: Path) -> Path:
    """A fresh venv that sees the running environment's packages; returns its site-packages."""
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv.parent)
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=venv.parent).stdout.strip())
    dependencies = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "_stablediff_test_dependencies.pth").write_text("".join(f"{path}\n" for path in dependencies))
    return site


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(venv, its site-packages, an empty working directory outside the repository) with the wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(tmp)
    venv = tmp / "venv"
    site = make_venv(venv)
    # The running pip installs into the new venv (--python), so the venv needs no pip of its own.
    run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
         "--no-index", str(wheel)], cwd=tmp)
    workdir = tmp / "work"
    workdir.mkdir()
    return venv, site, workdir


def test_the_venv_imports_the_installed_wheel_not_the_checkout(installed):
    venv, site, workdir = installed
    code = "import stablediff; from stablediff.config.loader import RECIPES; print(stablediff.__file__); print(RECIPES)"
    module, recipes = run([str(venv / "bin" / "python"), "-c", code], cwd=workdir).stdout.split()
    assert Path(module).resolve().is_relative_to(site.resolve())
    assert Path(recipes).resolve().is_relative_to(site.resolve())  # the recipes are package data
    assert (site / "stablediff" / "py.typed").is_file()


def test_the_installed_command_shows_its_help(installed):
    venv, _, workdir = installed
    assert "train" in run([str(venv / "bin" / "stablediff"), "--help"], cwd=workdir).stdout
    assert "digits" in run([str(venv / "bin" / "stablediff"), "demo", "--help"], cwd=workdir).stdout


def test_train_tiny_and_generate_work_from_any_directory(installed):
    venv, _, workdir = installed
    stablediff = str(venv / "bin" / "stablediff")
    run([stablediff, *TRAIN_TINY], cwd=workdir)
    run_dir = workdir / "runs" / "x"
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "samples" / "final.png").is_file()
    assert (run_dir / "export" / "diffusers" / "model_index.json").is_file()
    run([stablediff, "generate", "runs/x", "a prompt", "--out", "out", "--steps", "2"], cwd=workdir)
    assert [p.name for p in (workdir / "out").glob("*.png")] == ["00000-0.png"]
