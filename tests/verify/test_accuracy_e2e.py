"""Issue 4's accuracy figures from the run file of a real end-to-end run, not from functions.

Each test runs `python -m insitu_daq demo` as a user does (simulated station and daemon as
real processes over their real sockets, 1024 x 1024 frames, live analysis in the daemon),
then reads the run file (/entry/analysis) and the truth the demo polled from the simulated
microscope during the run (RUN.truth.json), and judges them with insitu_daq/verify/accuracy.py
(definitions there). Nothing is mocked.

Time scales, measured on the 2-core machine shared with other work (2026-11-24):
- The +4.3 V run is at time scale 2.5 (~70 s wall), the fastest at which the front speed is
  measured reliably. The speed fit wants 6 front positions within its 10 s window, and an LM
  look of 1 run s lasts 1 / scale s of wall time at 40 frames/s, minus the settling frames:
  at 10 the speed was never measured during the hold (2-3 LM results per look); at 5 it was
  measured in only 6 and 2 results of two runs (-0.1 % and -22 % against the truth); at 2.5
  in 36 (-0.2 %). (Later the same day, one run each: 275 results at 2.5, -0.3 %; 88 at 5 in
  the demo, +0.8 %.) At 10, when the machine was busy, the analysis process (niceness +10) also
  produced no result for up to 1.4 s wall (14 run s), which put the (200) onset 16 s late.
- The control is at 10 (~15 s wall): nothing to resolve in time there.

Rock-salt onset: judged as the issue states it, within 2 s of the truth, the truth onset
being when the HRTEM field first holds any rock salt (the 2.1 A spacing drawn at all), on the
measured side the first of 3 consecutive phase maps that see rock salt in at least one tile
(verify/accuracy.py). In this field rock salt enters at two corners, and a map sees it once it
covers half a corner tile, 1.55-1.93 s after the renderer's per-pixel truth first has any
(tests/analysis/test_analysis_pipeline.py); the truth here, polled every 0.5 run s on a 256 x 256
grid, sees it up to ~0.5 s later, and the runs measured +0.92 s (2.5) and +1.03 s (5, the demo).
The whole-field (200) ring of the spectrum, which the onset was judged on before, comes 3-4 s
after the truth (it needs ~20-30 % of the field); the verdict line reports it.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from insitu_daq.core.module_command import module_command
from insitu_daq.report.analysis import AnalysisRecord, read_analysis
from insitu_daq.report.events import HoldSpan, hold_span, read_events
from insitu_daq.verify.accuracy import (
    Verdict,
    accuracy_verdicts,
    format_verdicts,
    measured_onset,
    true_onset,
)
from insitu_daq.verify.truth import TruthSample, load_truth, truth_path

pytestmark = pytest.mark.timeout(300)

REFERENCE_TIME_SCALE = 2.5  # docstring: the fastest with a reliably measured front speed
CONTROL_TIME_SCALE = 10.0


def run_demo(
    data_dir: Path, protocol: str, time_scale: float
) -> tuple[str, AnalysisRecord, HoldSpan | None, list[TruthSample]]:
    started = time.monotonic()
    result = subprocess.run(
        module_command("insitu_daq", "demo", "--time-scale", str(time_scale),
                       "--frame-size", "1024", "--protocol", protocol, "--no-figure",
                       "--data-dir", str(data_dir)),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"demo {protocol} at time scale {time_scale:g}: {time.monotonic() - started:.1f} s wall")
    (run_file,) = data_dir.glob("*.h5")
    with h5py.File(run_file, "r") as f:
        analysis = read_analysis(f["entry"])
        hold = hold_span(read_events(f["entry"]))
    return result.stdout, analysis, hold, load_truth(truth_path(run_file))


def by_name(verdicts: list[Verdict]) -> dict[str, Verdict]:
    return {v.quantity: v for v in verdicts}


def test_the_reference_run_measures_spacings_front_speed_expansion_and_onset(
    tmp_path: Path,
) -> None:
    out, analysis, hold, truth = run_demo(
        tmp_path, "lno_4v3_until_rocksalt.yaml", REFERENCE_TIME_SCALE
    )
    assert len(truth) > 100 and hold is not None
    verdicts = accuracy_verdicts(analysis, truth, hold)
    report = format_verdicts(verdicts)
    print(report)
    # The demo prints the same verdicts.
    assert "accuracy against the truth (issue 4 figures)" in out
    assert "rock-salt onset (rock salt persistently seen in the phase map): measured" in out

    # d-spacings within 1 % (1.5-5 A): the layered lattice at the start, rock salt at the end.
    spacings = [v for v in verdicts if v.quantity.startswith("d ")]
    judged = {v.quantity for v in spacings}
    for title in ("LiNiO2 (003) 4.8 A", "LiNiO2 (101) 2.53 A", "NiO (200) 2.1 A"):
        assert f"d {title}" in judged, report
    assert all(v.ok for v in spacings), report

    # Front speed within 15 %, expansion within 2 percentage points (end of hold, every look).
    assert by_name(verdicts)["front speed (median over the hold)"].ok, report
    expansion = [v for v in verdicts if v.quantity.startswith("expansion")]
    assert len(expansion) == 2 and all(v.ok for v in expansion), report

    # Rock-salt onset within 2 s of the truth, and never before it (no early, false onset).
    onset = by_name(verdicts)["rock-salt onset (rock salt persistently seen in the phase map)"]
    assert onset.ok, report
    assert onset.measured is not None and onset.true is not None
    assert onset.measured >= onset.true, report
    # The whole-field ring comes later, never earlier, than the tiles see it.
    ring = measured_onset(analysis.reflections["nio_200"])
    assert ring is None or ring >= onset.measured, report
    first_rock_salt = true_onset(truth, 2.1)
    assert first_rock_salt == onset.true
    # Before the onset the field was layered and (200) absent: (003) was there, as truth says.
    before = analysis.reflections["lno_003"]
    early = before.time < first_rock_salt - 10
    assert np.mean(before.detected[early]) > 0.9


def test_the_no_bias_control_sees_no_phase_change(tmp_path: Path) -> None:
    out, analysis, hold, truth = run_demo(tmp_path, "lno_control_0v.yaml", CONTROL_TIME_SCALE)
    assert truth and max(abs(s.truth.get("bias_volts", 0.0)) for s in truth) < 0.1
    verdicts = accuracy_verdicts(analysis, truth, hold)
    report = format_verdicts(verdicts)
    print(report)
    assert "accuracy against the truth (issue 4 figures)" in out
    names = by_name(verdicts)
    assert set(names) == {
        "NiO (200) 2.1 A (none expected)",
        "Ni/Li disordered 1.95 A (none expected)",
        "rock salt seen in the phase map (none expected)",
        "rock salt fraction, largest (none expected)",
        "disordered fraction, largest (none expected)",
        "|expansion|, largest (none expected)",
    }
    assert all(v.ok for v in verdicts), report
    # Not vacuous: the lattice was analysed all along (the (003) of the layered particle seen).
    lattice = analysis.reflections["lno_003"]
    assert len(lattice.time) > 50 and np.mean(lattice.detected) > 0.9
