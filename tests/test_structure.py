"""The house rules that keep modules small enough to read: files under ~400 lines, functions under ~40."""

import ast
from pathlib import Path

import stablediff

SRC = Path(stablediff.__file__).resolve().parent
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 40


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_no_module_is_longer_than_the_limit():
    long = {str(p.relative_to(SRC)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"split these modules (over {MAX_FILE_LINES} lines): {long}"


def test_no_function_is_longer_than_the_limit():
    long = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(SRC)}:{node.lineno} {node.name}"] = lines
    assert not long, f"split these functions (over {MAX_FUNCTION_LINES} lines): {long}"
