"""The live analysis process (insitu_daq/live/): a real spawned process, real ZeroMQ ipc sockets.

The test plays the ingest's side of the frame tap: it binds the PUSH at the endpoint the
process connects to and sends [header JSON, payload] messages exactly as the contract says
(bslz4 payloads in HDF5 filter framing, made by the simulator's encoder), then reads the
results the process pushes back.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import zmq
from sim_frames import cell, hrtem_optics

from insitu_daq.analysis.drift import DriftSettings
from insitu_daq.analysis.pipeline import PipelineSettings
from insitu_daq.core.imaging import ImagingState
from insitu_daq.live.client import LiveAnalysis
from insitu_daq.sim import stream2_encode as s2
from insitu_daq.sim.model import LinearDrift
from insitu_daq.sim.optics import Optics
from insitu_daq.sim.render import FrameRenderer, Scene

SHAPE = (1024, 1024)
FRAME_S = 0.025
HRTEM_M = 0.06e-9
LM_M = 1.0e-9


class Tap:
    """The ingest's end of the frame tap, and the results the process sends back."""

    def __init__(
        self, settings: PipelineSettings | None = None, max_rate_hz: float | None = None
    ) -> None:
        self.results: list[dict] = []
        self.announced = 0  # imaging states announced in the run
        self.arrived = threading.Condition()
        self.analysis = LiveAnalysis(
            settings or PipelineSettings(), self._on_result, max_rate_hz=max_rate_hz
        )
        self.context = zmq.Context()
        self.push = self.context.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, 2)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.bind(self.analysis.frame_endpoint)
        self.analysis.start()
        self.analysis.wait_ready()

    def imaging(self, *states: tuple[float, float, str, float], watermark: float = math.inf):
        """Announce `states` (start, end, mode, pixel size) as the daemon does, then a
        watermark (by default: everything is known)."""
        for seq, (start, end, mode, pixel_m) in enumerate(states, self.announced + 1):
            self.analysis.set_imaging(ImagingState(start, end, mode, pixel_m, math.nan), seq)
        self.announced += len(states)
        self.analysis.imaging_watermark(watermark, self.announced)

    def _on_result(self, result: dict) -> None:
        with self.arrived:
            self.results.append(result)
            self.arrived.notify_all()

    def send(
        self,
        frame: np.ndarray,
        image_id: int,
        frame_time: float,
        compression: str | None = "bslz4",
        flags: int = 0,
    ) -> None:
        payload = s2.bslz4_compress(frame) if compression == "bslz4" else frame.tobytes()
        header = {
            "image_id": image_id,
            "series_id": 1,
            "frame_time": frame_time,
            "shape": list(frame.shape),
            "dtype": frame.dtype.str,
            "compression": compression,
            "received_ns": time.time_ns(),
        }
        self.push.send_multipart([json.dumps(header).encode(), payload], flags=flags)

    def wait_for(self, image_id: int, timeout_s: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout_s
        with self.arrived:
            while True:
                for result in self.results:
                    if result["image_id"] == image_id:
                        return result
                left = deadline - time.monotonic()
                assert left > 0, f"no result for image {image_id}: {self.analysis.stats()}"
                self.arrived.wait(left)

    def close(self) -> None:
        self.analysis.stop()
        self.push.close(0)
        self.context.term()


@pytest.fixture
def tap() -> Iterator[Tap]:
    tap = Tap(PipelineSettings(phase_map_interval_s=40 * FRAME_S))
    yield tap
    tap.close()


def _frames(model, optics: Optics, n: int, seed: int = 1) -> list[np.ndarray]:
    renderer = FrameRenderer(SHAPE, seed=seed)
    scene = Scene.capture(model, optics)
    return [renderer.render(scene, FRAME_S, i)[0] for i in range(n)]


def test_stream_of_hrtem_frames_gives_spacings_and_fractions_within_accuracy(tap: Tap) -> None:
    """A second of frames of a field with the front in it, each analysed (sent one after the
    other's result): d of (003) and NiO (200) within 1 %, fractions near the truth."""
    model, optics = cell(x=0.7), hrtem_optics()
    frames = _frames(model, optics, 41)
    tap.analysis.new_run()
    tap.imaging((-math.inf, -math.inf, "hrtem", HRTEM_M))
    for image_id, frame in enumerate(frames):
        tap.send(frame, image_id, image_id * FRAME_S)
        result = tap.wait_for(image_id)
    values = result["values"]
    # summed to the default dose of 5 counts/px: ~31 frames of ~0.16 counts/px
    dose_frames = 5.0 / float(np.mean([frame.mean() for frame in frames]))
    assert abs(result["integrated_frames"] - dose_frames) <= 3 and result["mode"] == "hrtem"
    assert values["d_spacing_m.lno_003"] == pytest.approx(4.8e-10, rel=0.01)
    assert values["d_spacing_m.nio_200"] == pytest.approx(2.1e-10, rel=0.01)
    _, truth = FrameRenderer(SHAPE, seed=1).render(Scene.capture(model, optics), FRAME_S, 0)
    field = truth.field_phase_fractions
    particle = field["layered"] + field["disordered"] + field["rock_salt"]
    assert values["rock_salt_fraction"] == pytest.approx(field["rock_salt"] / particle, abs=0.15)
    assert result["latency_s"] is not None and result["latency_s"] > 0
    totals = result["totals"]
    assert totals["frames_analysed_total"] == 41 and totals["frames_skipped_total"] == 0


def test_frames_sent_faster_than_analysed_are_skipped_and_counted(tap: Tap) -> None:
    frames = _frames(cell(x=0.0), hrtem_optics(), 4)
    tap.imaging((-math.inf, -math.inf, "hrtem", HRTEM_M))
    sent = 30
    for image_id in range(sent):  # back to back: the PUSH waits only when both queues are full
        tap.send(frames[image_id % 4], image_id, image_id * FRAME_S)
    last = tap.wait_for(sent - 1)  # the newest is always analysed
    totals = last["totals"]
    assert totals["frames_received_total"] == sent
    assert totals["frames_skipped_total"] > 0
    # Every frame received is accounted for once: summed (then measured, or skipped behind a
    # newer one: its dose is in the sum all the same), or not usable.
    summed = totals["frames_analysed_total"] + totals["frames_skipped_total"]
    assert totals["frames_summed_total"] == summed
    unusable = sum(totals[f"{k}_total"] for k in ("frames_no_state", "frames_settling",
                                                  "malformed", "errors"))  # fmt: skip
    assert summed + unusable == sent, totals
    assert totals["errors_total"] == totals["malformed_total"] == 0
    assert sum(r["skipped"] for r in tap.results) == totals["frames_skipped_total"]


def test_the_rate_cap_measures_the_newest_frame_and_every_frame_brings_its_dose() -> None:
    # 40 frames/s offered for 1.5 s to an analysis capped at 4 a second: ~6 results, each
    # stamped at the newest frame offered at that moment; the frames between results have no
    # result of their own (skipped, counted) but are in the dose sum all the same.
    capped = Tap(max_rate_hz=4.0)
    try:
        frame = _frames(cell(x=0.0), hrtem_optics(), 1)[0]
        payload = s2.bslz4_compress(frame)
        capped.imaging((-math.inf, -math.inf, "hrtem", HRTEM_M))
        offered, began = 0, time.monotonic()
        while time.monotonic() - began < 1.5:
            header = {"image_id": offered, "series_id": 1, "frame_time": offered * FRAME_S,
                      "shape": list(frame.shape), "dtype": frame.dtype.str,
                      "compression": "bslz4", "received_ns": time.time_ns()}  # fmt: skip
            with contextlib.suppress(zmq.Again):  # as the ingest offers: never waiting
                capped.push.send_multipart([json.dumps(header).encode(), payload], zmq.NOBLOCK)
            offered += 1
            time.sleep(FRAME_S)
        time.sleep(0.5)
        with capped.arrived:
            analysed = [r for r in capped.results if r.get("image_id") is not None]
        assert 4 <= len(analysed) <= 8, [r["image_id"] for r in analysed]
        gaps = np.diff(sorted(r["image_id"] for r in analysed))
        assert np.median(gaps) >= 6  # ~10 frames of 25 ms between analyses at 4 a second
        assert offered >= 40
        # Nearly every frame up to the last result was summed (the tap may refuse a few):
        # its result plus those before it plus the ones summed without a result of their own.
        last = analysed[-1]
        summed = len(analysed) + sum(r["skipped"] for r in analysed)
        assert summed >= 0.8 * (last["image_id"] + 1), (summed, last["image_id"])
        assert last["totals"]["frames_summed_total"] == summed
        # So the sum holds the frames of the dose (5 counts/px: ~31 of ~0.16), not ~6 results.
        dose_frames = 5.0 / float(frame.mean())
        assert last["integrated_frames"] >= min(0.8 * dose_frames, 0.8 * last["image_id"])
    finally:
        capped.close()


def test_frames_within_a_mode_switch_are_skipped_as_settling(tap: Tap) -> None:
    """LM until a switch to HRTEM commanded at 1.000 s and done at 1.010 s: frames whose
    exposure may overlap it or that come within one frame period after it are skipped."""
    lm = _frames(cell(x=0.0), Optics(), 1)[0]
    hrtem = _frames(cell(x=0.0), hrtem_optics(), 1)[0]
    tap.imaging((-math.inf, -math.inf, "lm", LM_M), (1.0, 1.01, "hrtem", HRTEM_M))
    # image_id * 25 ms: 38 -> 0.95 s, 39 -> 0.975 (LM), 40 -> 1.0, 41 -> 1.025 (settling),
    # 42 -> 1.05 s (HRTEM).
    for image_id, frame in ((38, lm), (39, lm), (40, lm), (41, hrtem), (42, hrtem)):
        tap.send(frame, image_id, image_id * FRAME_S)
        time.sleep(0.3)  # one at a time: none skipped as "behind"
    last = tap.wait_for(42)
    assert last["mode"] == "hrtem" and last["settling"] == 2
    assert last["values"]["d_spacing_m.lno_003"] == pytest.approx(4.8e-10, rel=0.01)
    assert tap.wait_for(39)["mode"] == "lm"
    assert "expansion" in tap.wait_for(39)["values"]
    assert {r["image_id"] for r in tap.results} == {38, 39, 42}
    assert last["totals"]["frames_settling_total"] == 2


def test_garbage_on_the_tap_is_counted_and_the_process_keeps_going(tap: Tap) -> None:
    frame = _frames(cell(x=0.0), Optics(), 1)[0]
    tap.imaging((-math.inf, -math.inf, "lm", LM_M))
    tap.push.send_multipart([b"not json", b"x"])
    time.sleep(0.2)
    tap.push.send_multipart([json.dumps({"image_id": 1, "shape": [4]}).encode(), b"x"])
    time.sleep(0.2)
    bad_payload = {"image_id": 2, "frame_time": 0.05, "shape": [1024, 1024], "dtype": "<u2",
                   "compression": "bslz4", "received_ns": time.time_ns()}  # fmt: skip
    tap.push.send_multipart([json.dumps(bad_payload).encode(), b"\x00" * 40])
    time.sleep(0.2)
    tap.send(frame, 3, 0.075, compression=None)  # raw payloads are analysed too
    result = tap.wait_for(3)
    assert result["totals"]["malformed_total"] == 3
    assert result["values"]["projected_area_m2"] == pytest.approx(np.pi * 250e-9**2, rel=0.03)
    assert tap.analysis.alive


def test_a_frame_waits_for_the_state_that_covers_it_then_is_analysed_in_it(tap: Tap) -> None:
    """A frame that arrives before anything is known about its time is held (not analysed,
    not dropped) until the daemon's announcements cover it, then summed in its state."""
    frame = _frames(cell(x=0.0), Optics(), 1)[0]
    tap.send(frame, 0, 0.0)
    time.sleep(0.5)
    assert tap.results == []
    tap.imaging((-math.inf, -math.inf, "lm", LM_M), watermark=0.5 * FRAME_S)
    result = tap.wait_for(0)
    assert result["mode"] == "lm" and result["totals"]["frames_no_state_total"] == 0
    tap.send(frame, 1, FRAME_S)  # the watermark has not passed it: held until the next one
    time.sleep(0.5)
    assert [r["image_id"] for r in tap.results] == [0]
    tap.imaging(watermark=2 * FRAME_S)
    assert tap.wait_for(1)["mode"] == "lm"


def test_frames_after_a_switch_announced_late_go_into_the_new_modes_sum(tap: Tap) -> None:
    """The loaded PC of issue 9: HRTEM until 1.0 s, then LM; the frames reach the analysis
    long before the daemon's word of the switch. Held by the watermark, none of the LM
    frames is summed as HRTEM (which blanked (003) in the closed-loop demo), and the LM
    frames are measured at low magnification."""
    hrtem = _frames(cell(x=0.0), hrtem_optics(), 8)
    lm = _frames(cell(x=0.0), Optics(), 1)[0]
    tap.imaging((-math.inf, -math.inf, "hrtem", HRTEM_M), watermark=0.0)
    ids = range(30, 60)  # 0.75 s to 1.475 s: HRTEM until 1.0, LM after
    for image_id in ids:
        tap.send(lm if image_id * FRAME_S >= 1.0 else hrtem[image_id % 8], image_id,
                 image_id * FRAME_S)  # fmt: skip
        time.sleep(0.01)
    time.sleep(0.5)
    assert tap.results == []  # nothing decidable yet: the watermark is at 0
    tap.imaging(watermark=0.99)  # the daemon catches up: a switch begun at 0.99 ...
    before = tap.wait_for(39)  # (0.975 s: the newest frame whose exposure ended by 0.99)
    assert before["mode"] == "hrtem"
    assert before["values"]["d_spacing_m.lno_003"] == pytest.approx(4.8e-10, rel=0.01)
    tap.imaging((0.99, 1.0, "lm", LM_M), watermark=1.5)  # ... done at 1.0
    last = tap.wait_for(59)
    assert last["mode"] == "lm"
    assert last["values"]["projected_area_m2"] == pytest.approx(np.pi * 250e-9**2, rel=0.03)
    modes = {r["image_id"]: r["mode"] for r in tap.results}
    assert all(mode == ("lm" if i * FRAME_S > 1.0 else "hrtem") for i, mode in modes.items())
    totals = last["totals"]
    # 40 (1.0 s) overlaps the switch, 41 (1.025 s) comes within a period after its end.
    assert totals["frames_settling_total"] == 2, totals
    assert totals["frames_no_state_total"] == 0 and totals["frames_state_late_total"] == 0
    assert totals["frames_summed_total"] == 28


def test_a_lost_switch_announcement_leaves_its_frames_without_state(tap: Tap) -> None:
    """The switch to LM never arrives (a dropped message): the next watermark says two states
    were announced, so the frames after the last watermark are not summed at all."""
    frame = _frames(cell(x=0.0), Optics(), 1)[0]
    tap.imaging((-math.inf, -math.inf, "lm", LM_M), watermark=0.5)
    for image_id in range(30, 36):
        tap.send(frame, image_id, image_id * FRAME_S)
        time.sleep(0.05)
    tap.announced += 1  # the daemon announced a second state this process never got
    tap.imaging(watermark=2.0)
    tap.send(frame, 36, 0.4)  # and a frame from before the loss: still analysed
    tap.wait_for(36)
    time.sleep(0.3)
    totals = tap.analysis.stats()
    assert {r["image_id"] for r in tap.results} == {36}
    assert totals.get("imaging_states_lost_total", 1) == 1


def test_stop_ends_the_process_and_is_idempotent() -> None:
    tap = Tap()
    process = tap.analysis.process
    tap.close()
    assert process is not None and not process.is_alive() and process.exitcode == 0
    tap.analysis.stop()
    tap.analysis.new_run()  # after stop: dropped and counted, no exception
    assert tap.analysis.commands_dropped_total == 1


def test_a_drifting_field_is_measured_through_the_process() -> None:
    """The station's `[analysis] drift = true` (analysis/drift.py) through the real process:
    10 s of LM frames 1 s apart, the field drifting 0.5 nm/s at 1 nm/px. The last result's
    drift is within 0.5 px of the truth since the first frame, its rate within 10 %, and the
    drift reaches the result's values as declared (analysis/quantities.py)."""
    drifting = Tap(PipelineSettings(drift=DriftSettings(enabled=True)))
    try:
        model, renderer = cell(x=0.0), FrameRenderer(SHAPE, seed=4)
        model.drift = LinearDrift(0.5, -60.0)
        drifting.imaging((-math.inf, -math.inf, "lm", LM_M))
        truths = []
        for image_id, t in enumerate(np.arange(0.0, 10.01, 1.0)):
            model.advance_to(float(t))
            frame, truth = renderer.render(Scene.capture(model, Optics()), FRAME_S, image_id)
            truths.append(truth)
            drifting.send(frame, image_id, float(t))
        last = drifting.wait_for(len(truths) - 1)
    finally:
        drifting.close()
    values, first, end = last["values"], truths[0], truths[-1]
    assert values["drift_x_nm"] == pytest.approx(end.drift_x_nm - first.drift_x_nm, abs=0.5)
    assert values["drift_y_nm"] == pytest.approx(end.drift_y_nm - first.drift_y_nm, abs=0.5)
    assert values["drift_rate_nm_s"] == pytest.approx(0.5, rel=0.10)
