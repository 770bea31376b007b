"""`insitu-daq demo`, the README's main command, as a user runs it (faster and smaller).

At this time scale and frame size (256 px: four phase-map tiles in the HRTEM field, ~1 s of
wall time for the whole hold) whether the closed-loop hold ends on its condition or its
timeout is not asserted here; tests/service/test_daemon_analysis_e2e.py checks `hold until` on a
live value and tests/verify/test_accuracy_e2e.py the analysis's accuracy at full frame size.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import h5py

from insitu_daq.core.module_command import module_command


def test_demo_runs_the_reference_experiment_and_prints_what_it_measured(tmp_path: Path) -> None:
    """With `--web`: the page's address while it runs, and after it the page serving the
    finished run until Ctrl-C. Started with SIGINT ignored, as a background job of a
    non-interactive shell (and the CI's runner) starts it: Ctrl-C must end it all the same."""
    demo = subprocess.Popen(
        module_command("insitu_daq", "demo", "--time-scale", "20", "--frame-size", "256",
                       "--data-dir", str(tmp_path), "--web"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    try:
        out = _until_the_page_stays_up(demo, timeout_s=240.0)
        address = re.search(r"web view     (http://127\.0\.0\.1:\d+/)\?run=(\S+)", out)
        assert address is not None, out
        runs = json.loads(urllib.request.urlopen(address[1] + "api/runs", timeout=10).read())
        listed = {run["name"]: run for run in runs["runs"]}
        assert listed[address[2]]["summary"]["outcome"] == "finished", listed
        replayed = urllib.request.urlopen(address[1] + f"api/runs/{address[2]}/replay", timeout=30)
        assert json.loads(replayed.read())["series"]["bias"]["t"]
    finally:
        rest = _after_ctrl_c(demo, timeout_s=60.0)
    out += rest
    assert demo.returncode == 0, out
    assert re.search(r"live view    http://127\.0\.0\.1:\d+/", out), out  # while it ran
    assert ": finished" in out
    assert "lost (missing image ids) 0, frame_time monotonic: yes" in out
    hold = next(line for line in out.splitlines() if line.startswith("hold "))
    assert "+4.300 V" in hold and "mean current" in hold and "charge" in hold
    (run_file,) = tmp_path.glob("*.h5")
    with h5py.File(run_file, "r") as f:
        assert f["/entry/instrument/detector/data"].shape[1:] == (256, 256)
        assert f["/entry/end_time"][()].decode()
        assert f["/entry/protocol/file_name"][()].decode() == "lno_4v3_until_rocksalt"
    # After the summary: live analysis next to the simulator's truth, and what ended the hold.
    comparison = out.split("next to the simulator's truth (same run times)", 1)[1]
    assert "lattice spacing (HRTEM FFT)" in comparison
    assert "LiNiO2 (003) 4.8 A" in comparison and "NiO (200) 2.1 A" in comparison
    assert "phase fractions of the HRTEM field" in comparison
    assert "front speed, median over the hold" in comparison and "(truth " in comparison
    assert any(f"hold ended by: {how}" in comparison for how in ("condition", "timeout"))
    # the truth was polled during the run: the field's conversion has a run time
    assert "truth: the HRTEM field was >= 90 % rock salt from" in comparison
    # and the report figure is next to the run file
    figure = run_file.with_suffix(".png")
    assert f"figure       {figure}" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _until_the_page_stays_up(demo: subprocess.Popen[str], timeout_s: float) -> str:
    """The demo's output up to the line that says the page stays up (AssertionError with what
    it printed if it ends or takes longer)."""
    assert demo.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    for line in demo.stdout:
        lines.append(line)
        if line.startswith("web view     "):
            return "".join(lines)
        assert time.monotonic() < deadline, "".join(lines)
    raise AssertionError("the demo ended without keeping the page up:\n" + "".join(lines))


def _after_ctrl_c(demo: subprocess.Popen[str], timeout_s: float) -> str:
    """Ctrl-C, then the rest of the demo's output (AssertionError, the demo killed, if it has
    not ended within `timeout_s`)."""
    demo.send_signal(signal.SIGINT)
    try:
        return demo.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired as timeout:  # chained: a failure before Ctrl-C stays shown
        demo.kill()
        rest = demo.communicate()[0]
        raise AssertionError(
            f"Ctrl-C did not end the demo within {timeout_s:g} s:\n{rest}"
        ) from timeout
