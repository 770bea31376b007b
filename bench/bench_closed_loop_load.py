"""The closed-loop demo beside CPU-bound processes, repeated: when its hold ends against the truth.

`insitu-daq demo` (closed loop: hold until rock_salt_fraction >= 0.9 for 2 s, at most 120 s;
time scale 5) runs R times beside 0, 1 and 2 busy-looping processes at normal priority. Each
run reports when the hold ended and when the simulator's truth first had >= 90 % rock salt in
the HRTEM field (both run-clock s), and the live analysis's counters of frames held for their
imaging state. The figure of merit is `end - truth` (never negative: the issue-9 fault made it
-60 s), with its spread.

    python bench/bench_closed_loop_load.py --runs 3 --hogs 0 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import h5py

from insitu_daq.module_command import module_command
from insitu_daq.report import hold_span, read_events
from insitu_daq.truthcompare import first_reached, load_truth, truth_path


@contextlib.contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def one_run(hogs: int, time_scale: float) -> dict[str, float | str | None]:
    with tempfile.TemporaryDirectory(prefix="bench-closed-loop-") as tmp, cpu_hogs(hogs):
        started = time.monotonic()
        result = subprocess.run(
            [*module_command("insitu_daq", "demo"), "--time-scale", str(time_scale),
             "--no-figure", "--data-dir", tmp],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        wall = time.monotonic() - started
        if result.returncode != 0:
            return {"error": result.stdout[-500:] + result.stderr[-500:]}
        (run_file,) = Path(tmp).glob("*.h5")
        with h5py.File(run_file, "r") as f:
            hold = hold_span(read_events(f["entry"]))
        truth_90 = first_reached(load_truth(truth_path(run_file)), "rock_salt", 0.9)
    assert hold is not None and hold.end_s is not None
    return {
        "hold_s": hold.end_s - hold.start_s,
        "end_minus_truth_s": None if truth_90 is None else hold.end_s - truth_90,
        "ended_by": hold.ended_by,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hogs", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--time-scale", type=float, default=5.0)
    args = parser.parse_args()
    for hogs in args.hogs:
        rows = [one_run(hogs, args.time_scale) for _ in range(args.runs)]
        for row in rows:
            print(f"hogs {hogs}: {row}", flush=True)
        deltas = [
            r["end_minus_truth_s"] for r in rows if isinstance(r.get("end_minus_truth_s"), float)
        ]
        if deltas:
            print(
                f"hogs {hogs}: {len(deltas)}/{len(rows)} ended with truth known; end - truth "
                f"min {min(deltas):+.1f} s, median {statistics.median(deltas):+.1f} s, "
                f"max {max(deltas):+.1f} s; ended by "
                f"{sorted({str(r.get('ended_by')) for r in rows})}",
                flush=True,
            )


if __name__ == "__main__":
    main()
