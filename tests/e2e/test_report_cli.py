"""`stablediff report RUN_DIR` on a run that `stablediff train` really wrote."""

from __future__ import annotations

import html
import re

from tests.conftest import run_cli


def test_report_writes_the_runs_report_and_prints_its_path(run_copy):
    result = run_cli("report", str(run_copy))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(run_copy / "report.html")
    page = (run_copy / "report.html").read_text()
    assert re.search(r'<section id="losses" class="plots"><h2>[^<]*</h2>\n<img src="data:image/png;base64,', page)
    assert f"<pre>{html.escape((run_copy / 'config.yaml').read_text())}</pre>" in page
    assert "eval.json (no checkpoint evaluated yet" in page  # tiny trains without evaluation
    assert (run_copy / "plots" / "losses.png").is_file()
    assert "<th>train images</th><td>64</td>" in page and "<th>held out images</th><td>359</td>" in page


def test_report_on_a_missing_run_directory_exits_1_with_one_paragraph(tmp_path):
    result = run_cli("report", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert "does not exist; name a run directory" in result.stderr and "Traceback" not in result.stderr
