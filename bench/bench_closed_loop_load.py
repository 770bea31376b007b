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
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from busy_pc import cpu_hogs, run_closed_loop_demo  # the tests' harness


def one_run(hogs: int, time_scale: float) -> dict[str, float | str | int | None]:
    with tempfile.TemporaryDirectory(prefix="bench-closed-loop-") as tmp, cpu_hogs(hogs):
        started = time.monotonic()
        try:
            hold = run_closed_loop_demo(Path(tmp), time_scale)
        except AssertionError as exc:
            return {"error": str(exc)[-500:]}
    return {
        "hold_s": round(hold.end_s - hold.start_s, 1),
        "end_minus_truth_s": None
        if hold.end_minus_truth_s is None
        else round(hold.end_minus_truth_s, 2),
        "ended_by": hold.ended_by,
        "frames": hold.frames,
        "wall_s": round(time.monotonic() - started, 1),
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
                f"hogs {hogs}: {len(deltas)}/{len(rows)} runs; end - truth "
                f"min {min(deltas):+.1f} s, median {statistics.median(deltas):+.1f} s, "
                f"max {max(deltas):+.1f} s; ended by "
                f"{sorted(str(r.get('ended_by')) for r in rows)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
