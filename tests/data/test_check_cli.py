"""`stablediff data check` as a user runs it: a real subprocess, every source format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stablediff.data.check import check_source

from .corpus import FORMATS, GOOD_CHECKS, expected

# The console script installed next to this interpreter (`pip install -e .`), or the same
# entry point through the interpreter when the package is only on the path.
SCRIPT = Path(sys.executable).with_name("stablediff")
STABLEDIFF = ([str(SCRIPT)] if SCRIPT.exists()
              else [sys.executable, "-c", "from stablediff.cli import main; main()"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*STABLEDIFF, *args], capture_output=True, text=True, timeout=120,
                          env=env)


def reported_reasons(report: dict) -> dict[str, str | None]:
    reasons = {item["key"]: reason for reason, items in report["rejects"].items() for item in items}
    return reasons


@pytest.mark.parametrize("fmt", FORMATS)
def test_check_json_reports_exactly_the_rejects(corpus_specs, fmt):
    result = run_cli("data", "check", corpus_specs[fmt], "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    want = {key: reason for key, reason in expected(fmt).items() if reason}
    assert reported_reasons(report) == want
    assert report["total"] == len(expected(fmt))
    assert report["accepted"] == len(GOOD_CHECKS)
    assert report["reject_counts"] == {r: list(want.values()).count(r) for r in set(want.values())}
    assert all(item["origin"] for items in report["rejects"].values() for item in items)
    assert sum(report["size_histogram"].values()) == len(GOOD_CHECKS)
    assert report["aspect_histogram"]["1:1"] == 8  # all but the 4:3 JPEG and the rotated 2:3
    assert report["captions"]["count"] == len(GOOD_CHECKS)


def test_check_human_output_lists_reasons_and_origins(corpus_specs):
    result = run_cli("data", "check", corpus_specs["folder"])
    assert result.returncode == 0, result.stderr
    for reason in set(expected("folder").values()) - {None}:
        assert reason in result.stdout
    assert "truncated_jpeg.jpg" in result.stdout and "accepted" in result.stdout


def test_check_options_change_the_verdicts(corpus_specs):
    result = run_cli("data", "check", corpus_specs["jsonl"], "--json",
                     "--caption-policy", "filename", "--min-size", "33")
    reasons = reported_reasons(json.loads(result.stdout))
    assert reasons["bilevel_png"] == "too_small"  # 32x32
    assert "sub/gray_png" not in reasons  # 40x40
    assert reasons["latin1_caption"] == "too_small"  # 16x16: image reasons come first
    result = run_cli("data", "check", corpus_specs["jsonl"], "--json", "--caption-policy", "empty")
    assert "no_caption" not in reported_reasons(json.loads(result.stdout))


@pytest.mark.parametrize("source", ["does/not/exist", "pyproject.toml"])
def test_check_of_a_bad_source_is_a_one_line_error(source, tmp_path):
    result = run_cli("data", "check", source)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_check_report_in_process_matches_the_corpus(corpus_specs):
    report = check_source(corpus_specs["parquet"]).to_dict()
    assert reported_reasons(report) == {k: r for k, r in expected("parquet").items() if r}
    assert report["modes"]["RGB"] >= 2 and report["format"] == "ParquetSource"


def test_check_survives_file_names_that_are_not_utf8(tmp_path):
    from .corpus import corpus_items

    (tmp_path / "[bold]img.png").write_bytes(corpus_items("folder")[2].data)  # no caption
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"), "wb") as handle:
        handle.write(b"not an image")
    human = run_cli("data", "check", str(tmp_path))
    assert human.returncode == 0, human.stderr
    assert "[bold]img.png" in human.stdout  # shown as written, not as rich markup
    assert "caf\ufffd.png" in human.stdout
    report = json.loads(run_cli("data", "check", str(tmp_path), "--json").stdout)
    assert report["reject_counts"] == {"undecodable": 1, "missing_caption": 1}
