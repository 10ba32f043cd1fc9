"""The dependency contract (pyproject.toml [tool.importlinter], DESIGN.md "Package layout and layers")
holds, and a wrong import breaks it; no package imports another package's private `_module`."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(src: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=src, env=env, capture_output=True, text=True, timeout=60)


def test_the_package_keeps_its_import_contracts():
    result = lint_imports(SRC)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_upward_import_from_checkpoint_breaks_the_contract(tmp_path):
    shutil.copytree(SRC / "stablediff", tmp_path / "stablediff", ignore=shutil.ignore_patterns("__pycache__"))
    store = tmp_path / "stablediff" / "checkpoint" / "store.py"
    store.write_text(store.read_text() + "\nimport stablediff.training.run  # deliberately wrong\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "checkpoint, data and models import nothing above them BROKEN" in result.stdout
    assert "stablediff.checkpoint.store -> stablediff.training.run" in result.stdout


def _imported_modules(path: Path, module: str) -> list[str]:
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def test_no_package_imports_another_packages_private_module():
    wrong = []
    for path in sorted((SRC / "stablediff").rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        own_package = module.split(".")[:2]
        for name in _imported_modules(path, module):
            parts = name.split(".")
            private = next((i for i, part in enumerate(parts) if part.startswith("_") and not part.endswith("__")), None)
            if parts[0] == "stablediff" and private is not None and private >= 2 and parts[:2] != own_package:
                wrong.append(f"{module} imports {name}")
    assert not wrong, wrong
