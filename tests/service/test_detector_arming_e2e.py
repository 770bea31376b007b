"""End to end: a station that arms its detector ([detector] control = "simplon").

The simulated camera serves its SIMPLON REST API and streams Stream V2 (in this process, over
real HTTP and ZeroMQ); `insitu-daq daemon` (a real process) arms it at `acquire: start`,
knows the series id it will stream, and disarms it at `acquire: stop`. The run file is read
back. Then the detector's API stops answering: the next `acquire: start` fails its step with
one line and the bias is made safe.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from test_daemon_e2e import LiveStation

from insitu_daq.sim import stream2_encode as s2

ARMED = """
name: armed
description: record one armed series for 0.6 wall seconds
steps:
  - acquire: start
  - wait: 12
  - acquire: stop
"""
BIASED = """
name: biased
description: the bias on, then recording
steps:
  - bias: {volts: 0.5, rate_volts_per_s: 1.0}
  - acquire: start
  - wait: 12
"""


def _image_of(series_id: int, image_id: int, shape: tuple[int, int]) -> bytes:
    """An image of another series than the armed one, as a detector would send it."""
    pixels = np.full(shape, 7, dtype="<u2")
    ticks = (image_id * 1_250_000, 50_000_000)
    return s2.image_message(
        series_id, f"OTHER-{series_id}", image_id, datetime.now(timezone.utc),
        ticks, (ticks[0] + 1_000_000, ticks[1]), (1_000_000, ticks[1]), {"threshold_1": pixels},
    )  # fmt: skip


def test_armed_series_is_recorded_alone_and_a_silent_detector_fails_the_step_safely(
    tmp_path: Path,
) -> None:
    shape = (128, 128)
    live = LiveStation(tmp_path, frame_shape=shape, detector_api=True, analysis=False)
    try:
        free_running = live.sims.camera.next_series_id - 1  # streaming since the start
        reply = live.run(ARMED, "armed")
        live.wait_for(lambda s: s["protocol"]["step_kind"] == "wait")
        api = live.sims.camera_api
        assert api is not None
        armed = api.detector.sequence_id
        assert armed is not None and armed > free_running
        # While the armed series records, images of others arrive on the same stream: a
        # straggler of the free-running series, and a newer series (which a listen-only
        # ingest takes as the detector's next series, ending the armed one).
        for series_id in (free_running, armed + 1):
            for image_id in range(3):
                assert live.sims.camera.send_raw(_image_of(series_id, image_id, shape))
        status = live.wait_closed(reply["run_id"])
        assert status["protocol"]["state"] == "finished", live.daemon_log()
        assert api.detector.state == "idle"  # disarmed

        # The detector's API gone: `acquire: start` fails with one line, the bias made safe.
        api.stop()
        failing = live.run(BIASED, "biased")
        status = live.wait_closed(failing["run_id"])
        assert status["protocol"]["state"] == "failed"
        reason = status["protocol"]["reason"]
        assert reason.startswith("step 2 (acquire): arming the detector: GET http://"), reason
        assert "\n" not in reason
        _, history, (volts, amps, _) = live.model_state()
        assert (volts, amps) == (0.0, 0.0), "output still on"
        assert max(v for _, v in history) == 0.5  # it was on, then ramped down
    finally:
        live.close()

    with h5py.File(reply["run_file"], "r") as f:
        detector = f["/entry/instrument/detector"]
        series, ids = detector["series_id"][:], detector["image_id"][:]
        assert set(series.tolist()) == {armed}
        assert np.array_equal(ids, np.arange(len(ids)))  # from its first image, none missing
        assert len(ids) >= 10  # ~24 at 40 frames/s
        messages = [m.decode() for m in f["/entry/events/message"][:]]
        kinds = [k.decode() for k in f["/entry/events/kind"][:]]
    detector_events = [m for m, k in zip(messages, kinds, strict=True) if k == "detector"]
    assert detector_events[0].startswith(f"detector armed and triggered: series {armed}, 40 ")
    assert detector_events[1:] == [f"detector disarmed: series {armed}"]
    foreign = [m for m in messages if m.endswith(f"the detector was armed for series {armed}")]
    assert len(foreign) == 6, messages
