"""The analysis' previews for the web view (live/preview.py), over a real ZeroMQ socket."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from sim_frames import cell, hrtem_optics

from insitu_daq.analysis.pipeline import FrameAnalyzer, PipelineSettings
from insitu_daq.live.preview import TOPIC, PreviewPublisher, PreviewTarget
from insitu_daq.sim.render import FrameRenderer, Scene

SHAPE = (256, 256)
FRAME_S = 0.025


def _hrtem_sum(analyzer: FrameAnalyzer, frames: int) -> None:
    renderer, optics, model = FrameRenderer(SHAPE, seed=5), hrtem_optics(), cell(x=0.7)
    for index in range(frames):
        frame, _ = renderer.render(Scene.capture(model, optics), FRAME_S, index)
        analyzer.analyze(frame, index * FRAME_S, "hrtem", 0.06)


def _wait_until(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


@pytest.fixture
def context() -> zmq.Context:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_previews_are_sent_only_to_a_watching_page_at_the_rate(
    context: zmq.Context, tmp_path: Path
) -> None:
    analyzer = FrameAnalyzer(PipelineSettings(phase_map_interval_s=0.0))
    _hrtem_sum(analyzer, 12)
    assert analyzer.last_sum is not None
    endpoint = f"ipc://{tmp_path}/previews"
    publisher = PreviewPublisher(context, PreviewTarget(endpoint, 2.0))
    page = context.socket(zmq.SUB)
    page.connect(endpoint)
    header = {"image_id": 11, "received_ns": 123}
    # Nobody subscribed yet: nothing is copied or sent.
    assert not publisher.offer(analyzer.last_sum, header, 12)
    page.setsockopt(zmq.SUBSCRIBE, b"")
    _wait_until(lambda: publisher.watched)
    assert publisher.offer(analyzer.last_sum, header, 12)
    # Due again only after 1 / rate_hz: the next result is not sent.
    assert not publisher.offer(analyzer.last_sum, header, 12)
    assert page.poll(5000)
    topic, raw, image, labels = page.recv_multipart()
    meta = json.loads(raw)
    assert topic == TOPIC
    assert meta["mode"] == "hrtem" and meta["image_id"] == 11 and meta["received_ns"] == 123
    assert meta["integrated_frames"] == 12 and meta["pixel_nm"] == pytest.approx(0.06)
    summed = np.frombuffer(image, dtype=meta["dtype"]).reshape(meta["shape"])
    np.testing.assert_array_equal(summed, analyzer.last_sum.summed)
    mapped = meta["phase_map"]
    assert mapped is not None
    grid = np.frombuffer(labels, dtype=np.uint8).reshape(mapped["shape"])
    assert grid.shape == analyzer.last_sum.phase_map.labels.shape  # type: ignore[attr-defined]
    assert publisher.sent == 1
    # The page leaves: the publisher hears it and stops copying sums.
    page.close(linger=0)
    _wait_until(lambda: not publisher.watched)
    time.sleep(0.6)
    assert not publisher.offer(analyzer.last_sum, header, 12)
    publisher.close()


def test_a_taken_endpoint_turns_previews_off_not_the_analysis(
    context: zmq.Context, tmp_path: Path
) -> None:
    endpoint = f"tcp://127.0.0.1:{_taken_port(context)}"
    publisher = PreviewPublisher(context, PreviewTarget(endpoint, 4.0))
    analyzer = FrameAnalyzer(PipelineSettings())
    _hrtem_sum(analyzer, 2)
    assert analyzer.last_sum is not None
    assert not publisher.offer(analyzer.last_sum, {}, 2)
    assert not publisher.watched
    publisher.close()


def _taken_port(context: zmq.Context) -> int:
    holder = context.socket(zmq.PUB)
    return holder.bind_to_random_port("tcp://127.0.0.1")
