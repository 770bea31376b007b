"""The closed-loop demo on a busy PC: CPU-bound processes beside `insitu-daq demo`, and when its
hold ended against the simulator's truth. Shared by tests/app/test_closed_loop_load_e2e.py and
bench/bench_closed_loop_load.py (which repeats it for the spread)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py

from insitu_daq.core.module_command import module_command
from insitu_daq.report.events import hold_span, read_events
from insitu_daq.verify.truth import first_reached, load_truth, truth_path

BUSY_LOOP = "while True: pass"


@contextlib.contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    """`count` CPU-bound processes at normal priority (a vendor GUI, a second analysis),
    killed on the way out."""
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


@dataclass(frozen=True)
class ClosedLoopHold:
    start_s: float  # run-clock s
    end_s: float
    ended_by: str  # "condition" or "timeout"
    truth_90_s: float | None  # when the truth's HRTEM field first had >= 90 % rock salt
    frames: int  # written to the run file
    output: str  # the demo's output (its end)

    @property
    def end_minus_truth_s(self) -> float | None:
        return None if self.truth_90_s is None else self.end_s - self.truth_90_s


def run_closed_loop_demo(data_dir: Path, time_scale: float = 5.0) -> ClosedLoopHold:
    """`insitu-daq demo` (closed loop) as a user runs it; AssertionError if it fails."""
    result = subprocess.run(
        [*module_command("insitu_daq", "demo"), "--time-scale", str(time_scale),
         "--no-figure", "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, output
    (run_file,) = data_dir.glob("*.h5")
    with h5py.File(run_file, "r") as f:
        hold = hold_span(read_events(f["entry"]))
        frames = len(f["entry/instrument/detector/image_id"])
    assert hold is not None and hold.end_s is not None, output
    truth_90 = first_reached(load_truth(truth_path(run_file)), "rock_salt", 0.9)
    return ClosedLoopHold(hold.start_s, hold.end_s, hold.ended_by, truth_90, frames, output)
