"""The web view's live state (web/state.py): run times, merged updates, run changes, bounds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from insitu_daq.analysis.reflections import DEFAULT_REFLECTIONS
from insitu_daq.web.state import LiveState, SeriesBuffer, Viewer

OFFSET = 100.0  # daemon-clock s at the run's start


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()  # viewers are woken through it; it need not run here
    yield loop
    loop.close()


def _status(run_id: str = "run-1", offset: float = OFFSET) -> dict[str, Any]:
    return {"run_id": run_id, "run_offset_s": offset, "protocol": {"state": "running"}}


def _bias(daemon_s: float, volts: float) -> dict[str, Any]:
    return {"time": daemon_s, "voltage": volts, "setpoint": volts, "current": 1e-9, "samples": 5}


def _connected(state: LiveState, loop: asyncio.AbstractEventLoop) -> Viewer:
    viewer = state.add_viewer(loop)
    assert state.take(viewer)["type"] == "snapshot"  # type: ignore[index]
    return viewer


def test_changes_while_a_viewer_is_busy_arrive_as_one_update_on_run_time(
    loop: asyncio.AbstractEventLoop,
) -> None:
    state = LiveState(DEFAULT_REFLECTIONS, "station")
    state.on_status(_status())
    viewer = _connected(state, loop)
    for k in range(3):
        state.on_bias(_bias(OFFSET + 10.0 + k, 4.3))
    state.on_event({"time": OFFSET + 12.5, "kind": "state", "message": "paused: look",
                    "data": {"state": "paused", "operator": "alice"}})  # fmt: skip
    values = {"d_spacing_m.lno_003": 4.8e-10, "rock_salt_fraction": 0.2}
    state.on_analysis({"time": 12.6, "mode": "hrtem", "values": values})
    state.on_status({**_status(), "protocol": {"state": "paused"}})
    update = state.take(viewer)
    assert update is not None and update["type"] == "update"
    assert update["append"]["bias"]["t"] == [10.0, 11.0, 12.0]
    assert update["append"]["bias"]["voltage"] == [4.3, 4.3, 4.3]
    assert update["events"] == [
        {"time": 12.5, "kind": "state", "message": "paused: look", "operator": "alice"}
    ]
    analysis = update["append"]["analysis"]
    assert analysis["t"] == [12.6]
    assert analysis["d_spacing_a.lno_003"] == [pytest.approx(4.8)]  # Å for the page
    assert update["status"]["protocol"]["state"] == "paused"  # the newest status only
    assert viewer.merged >= 6
    assert state.take(viewer) is None  # nothing new since


def test_samples_before_the_status_naming_the_run_are_placed_once_it_does(
    loop: asyncio.AbstractEventLoop,
) -> None:
    state = LiveState(DEFAULT_REFLECTIONS, "station")
    viewer = _connected(state, loop)
    state.on_bias(_bias(OFFSET - 30.0, 0.0))  # the previous run's end: not this run's
    state.on_event({"time": OFFSET + 0.1, "kind": "step", "message": "approach"})
    state.on_bias(_bias(OFFSET + 0.2, 0.0))
    state.on_status(_status())
    snapshot = state.take(viewer)
    assert snapshot is not None and snapshot["type"] == "snapshot"
    assert snapshot["series"]["bias"]["t"] == [pytest.approx(0.2)]
    assert [e["message"] for e in snapshot["events"]] == ["approach"]


def test_a_new_run_starts_every_viewer_afresh(loop: asyncio.AbstractEventLoop) -> None:
    state = LiveState(DEFAULT_REFLECTIONS, "station")
    state.on_status(_status("run-1"))
    viewer = _connected(state, loop)
    state.on_bias(_bias(OFFSET + 1.0, 1.0))
    state.set_preview("hrtem", {"time": 1.0}, b"png")
    state.on_status(_status("run-2", offset=500.0))
    state.on_bias(_bias(501.0, 2.0))
    snapshot = state.take(viewer)
    assert snapshot is not None and snapshot["type"] == "snapshot"
    assert snapshot["series"]["bias"]["voltage"] == [2.0]
    assert snapshot["previews"] == {}  # the old run's images are not this one's


def test_spectrum_rings_say_what_the_newest_hrtem_result_detected(
    loop: asyncio.AbstractEventLoop,
) -> None:
    state = LiveState(DEFAULT_REFLECTIONS, "station")
    state.on_status(_status())
    state.on_analysis({"time": 5.0, "mode": "hrtem",
                       "values": {"d_spacing_m.lno_003": 4.8e-10, "intensity.lno_003": 3.0,
                                  "d_spacing_m.nio_200": None}})  # fmt: skip
    state.on_analysis({"time": 5.1, "mode": "lm", "values": {"expansion": 0.1}})
    rings = [{"name": "lno_003"}, {"name": "nio_200"}]
    state.set_preview("fft", {"rings": rings}, b"png")
    shown = {ring["name"]: ring for ring in state.snapshot()["previews"]["fft"]["rings"]}
    assert shown["lno_003"]["detected"] and shown["lno_003"]["intensity"] == 3.0
    assert not shown["nio_200"]["detected"]
    assert state.snapshot()["previews"]["fft"]["url"] == "/api/preview/fft?v=1"


def test_a_long_run_keeps_its_whole_span_in_bounded_points() -> None:
    buffer = SeriesBuffer(limit=100)
    buffer.extend({"t": float(k), "v": float(k)} for k in range(1000))
    times = buffer.to_json()["t"]
    assert len(times) <= 100
    assert times[0] == 0.0 and times[-1] == 999.0  # the start and the newest stay
    assert times == sorted(times)
    recent = [t for t in times if t is not None and t >= 990]
    assert recent == [float(k) for k in range(990, 1000)]  # the newest at full resolution


def test_a_column_that_appears_later_is_aligned_with_none() -> None:
    buffer = SeriesBuffer()
    buffer.extend([{"t": 1.0, "a": 1.0}, {"t": 2.0, "b": 5.0}])
    assert buffer.to_json() == {"t": [1.0, 2.0], "a": [1.0, None], "b": [None, 5.0]}


def test_malformed_messages_are_counted_not_shown(loop: asyncio.AbstractEventLoop) -> None:
    state = LiveState(DEFAULT_REFLECTIONS, "station")
    state.on_status(_status())
    state.on_bias({"voltage": 1.0})
    state.on_analysis({"time": "soon", "values": {}})
    assert state.counters["bias_malformed"] == 1 and state.counters["analysis_malformed"] == 1
    assert state.snapshot()["series"]["bias"]["t"] == []


def test_previews_are_asked_for_only_while_a_page_is_connected(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    """With nobody watching, the analysis process copies no sum (it hears no subscription)."""
    import zmq

    from insitu_daq.core.config import parse_config
    from insitu_daq.live.preview import PreviewPublisher, PreviewTarget
    from insitu_daq.web.feeds import PreviewFeed

    endpoint = f"ipc://{tmp_path}/previews"
    config = parse_config({"web": {"preview_endpoint": endpoint}})
    context = zmq.Context()
    publisher = PreviewPublisher(context, PreviewTarget(endpoint, 4.0))
    state = LiveState(DEFAULT_REFLECTIONS, "station")
    feed = PreviewFeed(config, state)
    feed.start()
    try:
        time.sleep(0.5)
        assert not publisher.watched  # the web process is up, no page: nothing asked
        viewer = state.add_viewer(loop)
        _until(lambda: publisher.watched)
        state.remove_viewer(viewer)
        _until(lambda: not publisher.watched)
    finally:
        feed.stop()
        feed.join(5.0)
        publisher.close()
        context.destroy(linger=0)


def _until(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_heating_holders_temperature_is_kept_on_run_time_and_sent_as_it_comes(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """The event stream's `series` topic (service/sinks.py series_record): run-time rows with
    the columns the run file's log declares; the snapshot has them, an update the new ones."""
    state = LiveState(DEFAULT_REFLECTIONS, "station")
    state.on_status({**_status(), "temperature": {"temperature_c": 22.0, "heater_on": False}})
    state.on_series(
        {"name": "holder_temperature", "t": [3.0, 3.5], "value": [22.0, 24.5],
         "setpoint": [22.0, 25.0]}
    )  # fmt: skip
    viewer = state.add_viewer(loop)
    snapshot = state.take(viewer)
    assert snapshot is not None
    assert snapshot["series"]["holder_temperature"] == {
        "t": [3.0, 3.5], "value": [22.0, 24.5], "setpoint": [22.0, 25.0]
    }  # fmt: skip
    assert snapshot["status"]["temperature"]["heater_on"] is False
    state.on_series({"name": "holder_temperature", "t": [4.0], "value": [27.1], "setpoint": [27.5]})
    state.on_series({"name": "undeclared", "t": [4.0], "value": [1.0]})  # not a run-file log
    update = state.take(viewer)
    assert update is not None
    assert update["append"] == {
        "holder_temperature": {"t": [4.0], "value": [27.1], "setpoint": [27.5]}
    }
    assert state.counters["series_malformed"] == 1
    assert state.snapshot()["series"]["holder_temperature"]["t"] == [3.0, 3.5, 4.0]
