"""The closed-loop demo on a busy PC: the hold `until rock_salt_fraction >= 0.9` never ends
before the simulator's truth has 90 % rock salt in the HRTEM field.

Issue 9 saw it end after 35 s and 61 s (truth: 0 % rock salt) with one CPU-bound process beside
the demo: frames of a low-magnification burst reached the analysis before the switch that
covered them was known, were summed as HRTEM, and one phase map said rock salt 1.00. Frames are
now judged by event time against a watermark (imaging.py) and a condition must hold for 2 s of
event time (condition.py). Here `insitu-daq demo` runs as a user runs it (simulated station and
daemon as real processes) beside one and then two busy-looping processes at normal priority,
as a vendor GUI or a second analysis would load a microscope PC. bench/bench_closed_loop_load.py
repeats it and reports the spread (bench/README.md).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest

from insitu_daq.module_command import module_command
from insitu_daq.report import hold_span, read_events
from insitu_daq.truthcompare import first_reached, load_truth, truth_path

pytestmark = pytest.mark.timeout(400)

TIME_SCALE = 5.0  # the demo's default
BUSY_LOOP = "while True: pass"


@contextlib.contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    """`count` CPU-bound processes at normal priority, killed on the way out."""
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def closed_loop_hold(data_dir: Path) -> tuple[float, float | None, str, str]:
    """Run the closed-loop demo; (hold end, truth's 90 % time, how the hold ended, output)."""
    result = subprocess.run(
        [*module_command("insitu_daq", "demo"), "--time-scale", str(TIME_SCALE),
         "--no-figure", "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=360,
    )  # fmt: skip
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, output
    (run_file,) = data_dir.glob("*.h5")
    with h5py.File(run_file, "r") as f:
        hold = hold_span(read_events(f["entry"]))
    assert hold is not None and hold.end_s is not None, output
    truth_90 = first_reached(load_truth(truth_path(run_file)), "rock_salt", 0.9)
    return hold.end_s, truth_90, hold.ended_by, output


@pytest.mark.parametrize("hogs", [1, 2])
def test_the_closed_loop_hold_ends_no_earlier_than_the_truth_beside_busy_processes(
    tmp_path: Path, hogs: int
) -> None:
    with cpu_hogs(hogs):
        end, truth_90, ended_by, output = closed_loop_hold(tmp_path)
    print(f"{hogs} busy: hold ended at {end:.1f} s by {ended_by}; truth 90 % at {truth_90}")
    if ended_by == "condition":
        # The truth is polled every 0.5 run s: it may see 90 % up to 0.5 s after it happened.
        assert truth_90 is not None and end >= truth_90 - 0.5, output
    else:  # the 120 s timeout: then the truth had not reached 90 % long before it either
        assert ended_by == "timeout", output
        assert truth_90 is None or end - truth_90 < 30, output
