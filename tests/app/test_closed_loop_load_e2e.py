"""The closed-loop demo on a busy PC: the hold `until rock_salt_fraction >= 0.9` never ends
before the simulator's truth has 90 % rock salt in the HRTEM field.

Issue 9 saw it end after 35 s and 61 s (truth: 0 % rock salt) with one CPU-bound process beside
the demo: frames of a low-magnification burst reached the analysis before the switch that
covered them was known, were summed as HRTEM, and one phase map said rock salt 1.00. Frames are
now judged by event time against a watermark (core/imaging.py) and a condition must hold for 2 s of
event time (control/conditions.py). Here `insitu-daq demo` runs as a user runs it (simulated
station and daemon as real processes) beside one and then two busy-looping processes at normal
priority, as a vendor GUI or a second analysis would load a microscope PC.
bench/bench_closed_loop_load.py repeats it and reports the spread (bench/README.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from busy_pc import cpu_hogs, run_closed_loop_demo

pytestmark = pytest.mark.timeout(600)


# Two busy processes on this 2-core PC: every process of the demo is preempted, the harsher of
# the two loads issue 9 ran (one busy process was the case it saw). One busy process is no
# longer run here, for the suite's time (~60 s); bench/bench_closed_loop_load.py runs both.
@pytest.mark.parametrize("hogs", [2])
def test_the_closed_loop_hold_ends_no_earlier_than_the_truth_beside_busy_processes(
    tmp_path: Path, hogs: int
) -> None:
    with cpu_hogs(hogs):
        hold = run_closed_loop_demo(tmp_path)
    print(f"{hogs} busy: {hold.frames} frames; hold ended {hold.end_s - hold.start_s:.1f} s in, "
          f"by {hold.ended_by}; truth 90 % at {hold.truth_90_s}")  # fmt: skip
    assert hold.truth_90_s is not None, hold.output  # the particle did convert
    if hold.ended_by == "condition":
        # The truth is polled every 0.5 run s: it may see 90 % up to 0.5 s after it happened.
        assert hold.end_s >= hold.truth_90_s - 0.5, hold.output
    else:  # the 120 s timeout (a starved analysis): no earlier than the truth either
        assert hold.ended_by == "timeout" and hold.end_s > hold.truth_90_s, hold.output
