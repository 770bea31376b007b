"""Interleaving over the real daemon: the daemon's station switches the simulated microscope
over its socket on the hold's clock, the switches are events in the run file, and the frames
of the bursts are low-magnification frames.

Uses test_daemon_e2e's `LiveStation` (simulators in this process, `insitu-daq daemon` as a
real process, real sockets, the real run file).
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - registers the bslz4 filter the frames are stored with
import numpy as np
from test_daemon_e2e import LiveStation

from insitu_daq.report.events import hold_span, imaging_modes, read_events
from insitu_daq.sim.optics import ImagingMode

TIME_SCALE = 10.0
HOLD_S, EVERY_S, DWELL_S = 20.0, 5.0, 2.0
PROTOCOL = f"""
name: interleave_e2e
steps:
  - microscope: {{mode: lm, beam: on, dose_rate_e_per_a2_s: 2}}
  - approach: {{speed_nm_s: 1000, max_travel_nm: 5000}}
  - microscope: {{mode: hrtem, dose_rate_e_per_a2_s: 35}}
  - acquire: start
  - hold: {{duration_s: {HOLD_S}, interleave: {{mode: lm, every_s: {EVERY_S}, dwell_s: {DWELL_S}}}}}
  - acquire: stop
"""
SETTLE_S = 0.5  # run seconds: a frame exposed across a switch may mix both modes


def test_bursts_switch_the_microscope_on_the_hold_clock_and_their_frames_are_lm(
    tmp_path: Path,
) -> None:
    live = LiveStation(tmp_path, time_scale=TIME_SCALE, frame_shape=(64, 64))
    try:
        reply = live.run(PROTOCOL, "interleave_e2e")
        status = live.wait_closed(reply["run_id"])
        assert status["protocol"]["state"] == "finished", live.daemon_log()
        assert live.sims.station.optics.mode is ImagingMode.HRTEM  # back where it started
    finally:
        live.close()

    with h5py.File(reply["run_file"], "r") as f:
        events = read_events(f["entry"])
        frame_time = f["entry/instrument/detector/frame_time"][:]
        frames = f["entry/instrument/detector/data"][:]
    hold = hold_span(events)
    assert hold is not None and hold.end_s is not None and hold.ended_by == "duration"
    # The hold lasted its 20 s with the bursts inside it.
    assert HOLD_S <= hold.end_s - hold.start_s < HOLD_S + 0.5
    switches = [
        (t - hold.start_s, m) for t, k, m in events if k == "microscope" and "(interleave)" in m
    ]
    scheduled = [5.0, 7.0, 10.0, 12.0, 15.0, 17.0]
    assert [re.search(r"-> (\w+)", m)[1] for _, m in switches] == ["lm", "hrtem"] * 3
    for (at, _), expected in zip(switches, scheduled, strict=True):
        assert expected <= at < expected + 0.5, switches

    # The frames say the same: low-mag frames (whole particle at 1 nm/px, many counts per
    # pixel) inside the bursts, HRTEM ones (0.06 nm/px, few counts per pixel) between them.
    modes = imaging_modes(events)
    mean_counts = frames.reshape(len(frames), -1).mean(axis=1)[: len(frame_time)]
    in_lm, in_hrtem = [], []
    for start, stop in zip(scheduled[::2], scheduled[1::2], strict=True):
        inside = (frame_time > hold.start_s + start + SETTLE_S) & (
            frame_time < hold.start_s + stop - SETTLE_S
        )
        in_lm.append(mean_counts[inside])
        between = (frame_time > hold.start_s + stop + SETTLE_S) & (
            frame_time < hold.start_s + stop + EVERY_S - DWELL_S - SETTLE_S
        )
        in_hrtem.append(mean_counts[between])
    lm, hrtem = np.concatenate(in_lm), np.concatenate(in_hrtem)
    assert len(lm) >= 3 and len(hrtem) >= 3
    assert lm.min() > 5 * hrtem.max(), (lm, hrtem)
    assert modes[-1][1] == "hrtem"
