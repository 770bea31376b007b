"""`insitu-daq demo`, the README's main command, as a user runs it (faster and smaller).

At this time scale and frame size (256 px: four phase-map tiles in the HRTEM field, ~1 s of
wall time for the whole hold) whether the closed-loop hold ends on its condition or its
timeout is not asserted here; tests/service/test_daemon_analysis_e2e.py checks `hold until` on a
live value and tests/verify/test_accuracy_e2e.py the analysis's accuracy at full frame size.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import h5py

from insitu_daq.core.module_command import module_command


def test_demo_runs_the_reference_experiment_and_prints_what_it_measured(tmp_path: Path) -> None:
    result = subprocess.run(
        module_command("insitu_daq", "demo", "--time-scale", "20",
                       "--frame-size", "256", "--data-dir", str(tmp_path)),
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
