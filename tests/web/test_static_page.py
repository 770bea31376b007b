"""The web page's files (insitu_daq/web/static/), checked without a browser.

What a browser test would find late or not at all: an inline script, style or event handler
(the page must work under `Content-Security-Policy: default-src 'self'`), an asset or module
import that points at a missing file, a request to another host (the microscope network has no
internet), an element id the tests and the bench rely on that went missing, and a vendored uPlot
whose version no longer matches its README.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

STATIC = Path(__file__).resolve().parents[2] / "insitu_daq" / "web" / "static"

# The ids docs/WEB.md's page offers to tests that are in the HTML itself (the plot ids,
# #plot-bias and #plot-<panel>, are made by js/plots.js from the state's quantities).
LIVE_IDS = {
    "login-button", "login-user", "login-password", "login-token", "login-submit", "login-error",
    "logout-button", "pause-button", "pause-reason", "pause-confirm", "resume-button",
    "abort-button", "abort-reason", "abort-confirm", "mark-text", "mark-button",
    "control-message", "img-hrtem", "img-lm", "img-fft", "img-phase", "phase-toggle",
    "fft-rings", "plots", "event-log", "run-state", "connection", "scrubber", "play-button",
    "step", "tiles", "disconnected-banner",
}  # fmt: skip
RUNS_IDS = {"runs-table"}


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.problems: list[str] = []
        self.assets: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if attributes.get("id"):
            self.ids.add(attributes["id"])
        for name in attributes:
            if name.startswith("on"):
                self.problems.append(f"<{tag} {name}=...>: inline event handler")
        if "style" in attributes:
            self.problems.append(f"<{tag} style=...>: inline style")
        if tag == "style":
            self.problems.append("<style> element: inline style")
        if tag == "script":
            self._in_script = True
            if attributes.get("src"):
                self.assets.append(attributes["src"])
        if tag == "link" and attributes.get("href"):
            self.assets.append(attributes["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.problems.append("<script> with inline code")


def _parse(name: str) -> _Page:
    page = _Page()
    page.feed((STATIC / name).read_text(encoding="utf-8"))
    return page


def test_pages_have_nothing_inline_and_their_assets_exist() -> None:
    for name in ("index.html", "runs.html"):
        page = _parse(name)
        assert not page.problems, f"{name}: {page.problems}"
        for asset in page.assets:
            assert asset.startswith("/static/"), f"{name}: {asset} is not served from /static/"
            assert (STATIC / asset.removeprefix("/static/")).is_file(), f"{name}: {asset} missing"


def test_the_ids_tests_rely_on_are_there() -> None:
    assert not LIVE_IDS - _parse("index.html").ids
    assert not RUNS_IDS - _parse("runs.html").ids


def test_module_imports_resolve() -> None:
    for script in STATIC.rglob("*.js"):
        if "vendor" in script.parts:
            continue
        text = script.read_text(encoding="utf-8")
        for target in re.findall(r"""from\s+["'](\.{1,2}/[^"']+)["']""", text):
            assert (script.parent / target).resolve().is_file(), f"{script.name}: {target}"


def test_no_request_leaves_the_server() -> None:
    # Only same-origin paths: a CDN or web font would fail on the microscope network (and
    # under the Content-Security-Policy). The SVG namespace is a name, not a request.
    for path in STATIC.rglob("*"):
        if path.suffix not in {".js", ".html", ".css"} or "vendor" in path.parts:
            continue
        text = path.read_text(encoding="utf-8").replace("http://www.w3.org/2000/svg", "")
        assert not re.search(r"https?://", text), f"{path.name} names another host"


def test_vendored_uplot_matches_its_readme() -> None:
    banner = (STATIC / "vendor" / "uPlot.iife.min.js").read_text(encoding="utf-8")[:200]
    version = re.search(r"\(v(\d+\.\d+\.\d+)\)", banner)
    assert version, "no version banner in uPlot.iife.min.js"
    readme = (STATIC / "vendor" / "README.md").read_text(encoding="utf-8")
    assert f"| {version.group(1)} |" in readme
    assert (STATIC / "vendor" / "uPlot.min.css").is_file()
    assert "MIT" in (STATIC / "vendor" / "uPlot.LICENSE").read_text(encoding="utf-8")
