"""`insitu-daq demo`, the README's main command, as a user runs it (faster and smaller)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py


def test_demo_runs_the_reference_experiment_and_prints_what_it_measured(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "insitu_daq", "demo", "--time-scale", "20",
         "--frame-size", "256", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert ": finished" in out
    assert "lost (missing image ids) 0, frame_time monotonic: yes" in out
    hold = next(line for line in out.splitlines() if line.startswith("hold "))
    assert "+4.300 V" in hold and "mean current" in hold and "charge" in hold
    (run_file,) = tmp_path.glob("*.h5")
    with h5py.File(run_file, "r") as f:
        assert f["/entry/instrument/detector/data"].shape[1:] == (256, 256)
        assert f["/entry/end_time"][()].decode()
