"""The web view in a real browser: Debian's headless Chromium, driven by Playwright, against the
simulated station (in this process, so the test reads the model's true terminal voltage), a
real `insitu-daq daemon` and a real `insitu-daq web`, all over their real sockets.

One run serves the whole module (it is the slow part): the page is watched while the run goes
on, then aborted from the page by a logged-in operator, then replayed from its file on the runs
page. Screenshots go to $INSITU_DAQ_SCREENSHOTS (default: the test's temporary folder).

Without Chromium the tests are skipped with the command that installs it; `.ci/run` installs
it and sets INSITU_DAQ_REQUIRE_BROWSER, which turns that skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_daemon_e2e import LiveStation

from insitu_daq.app.children import ChildProcess, child_process, wait_for_output
from insitu_daq.app.demo import WEB_READY_TEXT, free_ports
from insitu_daq.core.module_command import module_command
from insitu_daq.web.auth import hash_password

TIME_SCALE = 20.0
OPERATOR, PASSWORD = "alice", "tip-in-contact"
VIEWER, VIEWER_PASSWORD = "vic", "just-looking"
# Chromium as the machine probe starts it: no background networking (this machine's closed
# network refuses it, noisily), no sandbox (root in a container), a fresh profile.
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
WATCHED = """
name: watched_run
description: contact, record LM then HRTEM (200 s at 0 V), hold +4.3 V until stopped
steps:
  - microscope: {mode: lm, beam: on, dose_rate_e_per_a2_s: 10}
  - approach: {speed_nm_s: 500, max_travel_nm: 5000}
  - acquire: start
  - wait: 2
  - microscope: {mode: hrtem, dose_rate_e_per_a2_s: 35}
  - wait:
      duration_s: 200
      interleave: {mode: lm, every_s: 20, dwell_s: 3, dose_rate_e_per_a2_s: 10}
  - bias: {volts: 4.3, rate_volts_per_s: 1.0}
  - hold: {duration_s: 3000}
  - bias: 0
  - acquire: stop
"""


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        why = "no chromium on PATH (as root: apt-get install chromium)"
        if os.environ.get("INSITU_DAQ_REQUIRE_BROWSER"):
            pytest.fail(why)
        pytest.skip(why)
    return path


def _web_config(port: int, preview_port: int) -> str:
    cheap = {"n": 2**12}  # login checks in tests need not cost 50 ms each
    return f"""
[web]
port = {port}
preview_endpoint = "tcp://127.0.0.1:{preview_port}"
preview_rate_hz = 4
[[web.users]]
name = "{OPERATOR}"
role = "operator"
password = "{hash_password(PASSWORD, **cheap)}"
[[web.users]]
name = "{VIEWER}"
password = "{hash_password(VIEWER_PASSWORD, **cheap)}"
"""


class WatchedStation:
    """The station, the daemon, the web view and a run in progress."""

    def __init__(self, tmp_path: Path) -> None:
        port, preview_port = free_ports(2)
        self.url = f"http://127.0.0.1:{port}"
        self.live = LiveStation(
            tmp_path, time_scale=TIME_SCALE, frame_shape=(512, 512),
            extra_config=_web_config(port, preview_port),
            # The page is under test here, not the budget: this protocol's long holds plan
            # ~1.1e5 e/A^2 in the HRTEM field, beyond the demo station's budget.
            dose_budget_e_per_a2=1e6,
        )  # fmt: skip
        self._web_log = tmp_path / "web.log"
        self._web = child_process(
            "web view",
            module_command("insitu_daq", "web", "--config", str(self.live.config_path)),
            self._web_log,
        )
        self.web: ChildProcess = self._web.__enter__()
        wait_for_output(self.web, WEB_READY_TEXT, timeout_s=30.0)
        reply = self.live.run(WATCHED, "watched_run")
        self.run_id, self.run_file = reply["run_id"], Path(reply["run_file"])

    def close(self) -> None:
        self._web.__exit__(None, None, None)
        self.live.close()


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WatchedStation]:
    _chromium()  # no station started for nothing
    watched = WatchedStation(tmp_path_factory.mktemp("watched"))
    yield watched
    watched.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("INSITU_DAQ_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1920, "height": 1080})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], f"the page raised: {errors}"


def _eventually(check: Callable[[], Any], timeout_s: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.25)


def _detected(page: Any, reflection: str) -> bool:
    return bool(_state(page, f"s.previews.fft.rings.find(r => r.name === '{reflection}').detected"))


def _state(page: Any, expression: str) -> Any:
    return page.evaluate(f"() => {{ const s = window.insituState; return s && ({expression}); }}")


def test_the_page_shows_the_run_as_it_happens(
    station: WatchedStation, page: Any, shots: Path
) -> None:
    page.goto(station.url + "/")
    # Images change: the HRTEM preview's version moves on, and the browser loads each one.
    first = _eventually(lambda: _state(page, "s.previews.hrtem && s.previews.hrtem.version"),
                        what="a first HRTEM preview")  # fmt: skip
    _eventually(lambda: (_state(page, "s.previews.hrtem.version") or 0) >= first + 3,
                what="newer HRTEM previews")  # fmt: skip
    _eventually(lambda: page.evaluate("() => window.insituStats.previewsShown.hrtem") >= 2,
                what="HRTEM previews loaded by the browser")  # fmt: skip
    assert page.evaluate("() => window.insituStats.previewsShown.lm") >= 1
    src_before = page.get_attribute("#img-hrtem", "src")
    _eventually(lambda: page.get_attribute("#img-hrtem", "src") != src_before,
                what="the HRTEM image to change")  # fmt: skip
    # The plots gain points.
    bias_points = _eventually(lambda: _state(page, "s.series.bias.t.length"), what="bias points")
    _eventually(lambda: _state(page, "s.series.bias.t.length") > bias_points + 10,
                what="more bias points")  # fmt: skip
    analysis_points = _state(page, "s.series.analysis.t.length")
    _eventually(lambda: _state(page, "s.series.analysis.t.length") > analysis_points,
                what="more analysis points")  # fmt: skip
    # The FFT shows the tracked rings: (003) of the layered particle detected before the bias.
    assert page.locator("#fft-rings circle").count() >= 6
    _eventually(lambda: _detected(page, "lno_003"), 30.0, "(003) detected at 0 V")
    drawn = page.get_attribute('#fft-rings circle[data-reflection="lno_003"]', "class") or ""
    assert "ring-detected" in drawn.split()
    assert "running" in page.inner_text("#run-state").lower()
    assert page.locator("#event-log li").count() >= 3
    page.screenshot(path=str(shots / "live-view.png"))


def test_controls_are_refused_without_login_and_for_a_viewer(
    station: WatchedStation, page: Any
) -> None:
    page.goto(station.url + "/")
    _eventually(lambda: _state(page, "s.status"), what="the status")
    assert not page.locator("#abort-button").is_enabled() or not page.is_visible("#abort-button")
    # Straight at the API, as a script on the page would: refused.
    refused = page.evaluate(
        """async () => (await fetch('/api/control/abort', {method: 'POST',
            headers: {'Content-Type': 'application/json'}, body: '{}'})).status"""
    )
    assert refused == 401
    _log_in(page, VIEWER, VIEWER_PASSWORD)
    as_viewer = page.evaluate(
        """async () => (await fetch('/api/control/pause', {method: 'POST',
            headers: {'Content-Type': 'application/json'}, body: '{}'})).status"""
    )
    assert as_viewer == 403
    status = station.live.request("status")
    assert status["protocol"]["state"] == "running"  # nothing reached the daemon


def _log_in(page: Any, user: str, password: str) -> None:
    page.click("#login-button")
    page.fill("#login-user", user)
    page.fill("#login-password", password)
    page.click("#login-submit")
    session = "async () => (await (await fetch('/api/session')).json()).user"
    _eventually(lambda: page.evaluate(session) == user, 10.0, f"{user} logged in")


def test_an_operator_marks_and_aborts_and_the_bias_is_made_safe(
    station: WatchedStation, page: Any, shots: Path
) -> None:
    page.goto(station.url + "/")
    _eventually(lambda: (_state(page, "s.series.bias.voltage.at(-1)") or 0) > 4.0, 90.0,
                "the bias at +4.3 V")  # fmt: skip
    # At +4.3 V the field turns rock salt: the page's spectrum shows NiO (200) appear.
    _eventually(lambda: _detected(page, "nio_200"), 90.0, "NiO (200) detected in the hold")
    _log_in(page, OPERATOR, PASSWORD)
    _eventually(lambda: page.is_enabled("#abort-button"), 10.0, "the abort button enabled")
    page.fill("#mark-text", "front reached the core")
    page.click("#mark-button")
    _eventually(lambda: "front reached the core" in page.inner_text("#event-log"), 20.0,
                "the mark in the event log")  # fmt: skip
    page.click("#abort-button")
    page.click("#abort-confirm")
    closed = station.live.wait_closed(station.run_id, timeout_s=90.0)
    assert closed["protocol"]["state"] == "aborted"
    _, history, (volts, amps, _) = station.live.model_state()
    assert volts == 0.0 and amps == 0.0  # the cell sees no bias: output off (sim/model.py)
    levels = [level for _, level in history]
    last_high = max(i for i, level in enumerate(levels) if level >= 4.29)
    down = levels[last_high + 1 :]
    assert down[-1] == 0.0 and len(down) >= 3, down  # ramped down through levels, not stepped
    assert not closed["bias"]["output_on"]
    _eventually(lambda: "abort" in page.inner_text("#run-state").lower(), 20.0,
                "the page saying aborted")  # fmt: skip
    log_text = page.inner_text("#event-log")
    assert OPERATOR in log_text  # who aborted, and who marked, is on the page
    page.screenshot(path=str(shots / "aborted.png"))
    # ... and in the run file's events.
    from insitu_daq.report.summary import summarize

    events = summarize(station.run_file)
    aborting = [m for _, kind, m in events.events if kind == "state" and "aborting" in m]
    assert aborting == [f"aborting by {OPERATOR}: aborted from the web page"], events.events
    marks = [m for _, kind, m in events.events if kind == "mark"]
    assert f"front reached the core ({OPERATOR})" in marks


def test_the_finished_run_replays_from_its_file(
    station: WatchedStation, page: Any, shots: Path
) -> None:
    station.live.wait_closed(station.run_id, timeout_s=90.0)
    page.goto(station.url + "/runs")
    row = page.locator(f'#runs-table tr[data-run="{station.run_id}"]')
    _eventually(lambda: row.count() == 1, 20.0, "the run listed")
    row.locator("a").first.click()
    _eventually(lambda: _state(page, "s.mode === 'replay' && s.series.bias.t.length > 10"), 30.0,
                "the replayed series")  # fmt: skip
    scrubber = page.locator("#scrubber")
    src_before = page.get_attribute("#img-hrtem", "src")
    scrubber.evaluate("(el) => { el.value = el.max * 0.8; el.dispatchEvent(new Event('input')); }")
    _eventually(lambda: page.get_attribute("#img-hrtem", "src") != src_before, 20.0,
                "the replayed image to follow the scrubber")  # fmt: skip
    page.screenshot(path=str(shots / "replay.png"))
