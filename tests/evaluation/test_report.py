"""RUN_DIR/report.html, opened in real headless Chromium (Debian's `chromium`, scripts/install-system.sh).

The run directory is built by hand from real files (tests/evaluation/conftest.py); Chromium loads the
report from disk as a user's browser would, and the tests read the DOM it built (`--dump-dom`) or the
pixels it drew (`--screenshot`).
"""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from stablediff.errors import MissingPathError
from stablediff.evaluation.report import write_report
from tests.evaluation.hand_run import BEST_STEP, HOSTILE, SAMPLE_STEPS

SECTIONS = ("summary", "losses", "metrics", "samples", "confusion", "data", "config")
# What the test adds to its own copy of the report (the report has no script): whether every image decoded.
LOAD_PROBE = ("<script>addEventListener('load', () => { document.body.dataset.loaded = [...document.images]"
              ".every(i => i.complete && i.naturalWidth > 0); document.body.dataset.images = "
              "document.images.length; });</script></body>")


class Dom(HTMLParser):
    """The elements (tag, attributes) and the text of a page."""

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def chromium(page: Path, profile: Path, *flags: str) -> str:
    """Run headless Chromium on `page` (a fresh profile per call); its stdout."""
    binary = shutil.which("chromium")
    assert binary, "chromium is not installed: run `bash scripts/install-system.sh` (make install does)"
    # A script that got through unescaped (alert) blocks headless Chromium: the timeout turns that into a failure.
    result = subprocess.run([binary, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}",
                             *flags, page.as_uri()], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def reported(make_evaluated_run, tmp_path_factory) -> tuple[Path, Dom]:
    """The evaluated run with its report written, and the DOM Chromium built from it."""
    run_dir = make_evaluated_run(tmp_path_factory.mktemp("report") / "run")
    path = write_report(run_dir)
    return run_dir, Dom(chromium(path, tmp_path_factory.mktemp("profile"), "--dump-dom"))


def test_the_report_has_every_section(reported):
    _, dom = reported
    assert [a["id"] for a in dom.all("section")] == list(SECTIONS)


def test_every_image_is_an_inline_png(reported):
    _, dom = reported
    sources = [a["src"] for a in dom.all("img")]
    assert len(sources) == 1 + 4 + len(SAMPLE_STEPS) + 1  # losses, fd/kid/adherence/val_loss, the grids, confusion
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).format == "PNG"
    assert not dom.all("link") and not dom.all("script")  # nothing fetched, nothing run


def test_chromium_loads_every_image(reported, tmp_path):
    run_dir, _ = reported
    probed = tmp_path / "probed.html"
    probed.write_text((run_dir / "report.html").read_text().replace("</body>", LOAD_PROBE))
    body, = Dom(chromium(probed, tmp_path / "profile", "--dump-dom")).all("body")
    assert body["data-loaded"] == "true" and body["data-images"] == "10"


def test_the_plots_folder_holds_the_same_pngs(reported):
    run_dir, dom = reported
    inline = {base64.b64decode(a["src"].split(",", 1)[1]) for a in dom.all("img")}
    written = {p.read_bytes() for p in (run_dir / "plots").glob("*.png")}
    assert len(written) == 6 and written <= inline


def test_the_best_checkpoint_is_marked(reported):
    _, dom = reported
    assert [a["data-step"] for a in dom.all("p", id="best")] == [str(BEST_STEP)]
    assert [a["data-step"] for a in dom.all("tr", **{"class": "best"})] == [str(BEST_STEP)]
    assert [a["data-step"] for a in dom.all("figure", **{"class": "best"})] == [str(BEST_STEP)]
    assert [a["data-step"] for a in dom.all("figure")] == [str(step) for step in SAMPLE_STEPS]


def test_hostile_captions_and_config_values_are_shown_as_text(reported):
    _, dom = reported
    assert not dom.all("script")
    shown = [chunk for chunk in dom.text if HOSTILE in chunk]
    assert len(shown) >= 3  # the prompt's row label, the config, the quarantine key


def test_a_screenshot_of_the_report_is_not_blank(reported, tmp_path):
    run_dir, _ = reported
    shot = tmp_path / "shot.png"
    chromium(run_dir / "report.html", tmp_path / "profile", "--window-size=1280,2400", f"--screenshot={shot}")
    pixels = Image.open(shot).convert("RGB")
    assert pixels.size == (1280, 2400)
    inked = sum(count for count, colour in pixels.getcolors(1 << 24) if colour != (255, 255, 255))
    assert inked > 0.05 * 1280 * 2400 and len(pixels.getcolors(1 << 24)) > 100


def test_a_run_with_nothing_evaluated_yet_renders_and_says_what_is_missing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"stage": "unet", "step": 1, "loss": 0.9}\n'
                                           '{"stage": "unet", "step": 2, "loss": 0.7}\n')
    dom = Dom(chromium(write_report(run_dir), tmp_path / "profile", "--dump-dom"))
    assert [a["id"] for a in dom.all("section")] == list(SECTIONS)
    assert len(dom.all("img")) == 1  # the loss curve, nothing else yet
    notes = " ".join(dom.text)
    assert "No checkpoint evaluated yet" in notes and "No sample grids yet" in notes
    assert "Adherence has not been evaluated yet" in notes and "No config.yaml" in notes


def test_an_empty_run_directory_gets_a_report(tmp_path):
    page = write_report(tmp_path).read_text()
    assert "No best checkpoint is marked yet" in page and "No losses logged yet" in page
    assert not (tmp_path / "plots" / "losses.png").exists()


def test_a_rewrite_drops_the_plots_the_run_no_longer_has(evaluated_run):
    write_report(evaluated_run)
    (evaluated_run / "eval.json").unlink()
    write_report(evaluated_run)
    assert sorted(p.name for p in (evaluated_run / "plots").glob("*.png")) == [
        "losses.png", "metric-adherence.png", "metric-fd.png", "metric-kid.png", "metric-val_loss.png"]


def test_a_missing_run_directory_is_the_users_mistake(tmp_path):
    with pytest.raises(MissingPathError, match="does not exist"):
        write_report(tmp_path / "nowhere")
