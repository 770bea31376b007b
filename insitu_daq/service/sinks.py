"""The daemon's record subscribers (service/bus.py), besides the live values (live_values.py).

In the order the daemon subscribes them: the run file (the durable copy first), the live
values, the analysis's expansion reference, the metrics, the event stream. Each is called in
the publishing thread and does what the daemon's hand-wired callbacks did for its part.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from insitu_daq.analysis.quantities import RESULT_KEYS
from insitu_daq.core.records import Event, level_change_mask
from insitu_daq.ingest import IngestClient
from insitu_daq.live.client import LiveAnalysis
from insitu_daq.runfile import layout
from insitu_daq.service.api.events import EventPublisher
from insitu_daq.service.bus import RecordSink
from insitu_daq.service.live_values import OpenRun
from insitu_daq.service.metrics import DaemonMetrics

BIAS_OFF_VOLTS = 1e-6  # a setpoint above this is "the bias left 0 V"


def analysis_record(result: dict[str, Any]) -> dict[str, Any]:
    """What of a live-analysis result the run file and the event stream keep."""
    return {key: result[key] for key in RESULT_KEYS if key in result}


def readings_of(batch: np.ndarray) -> np.ndarray:
    """The source-meter's readings in a sample batch (not the commanded level changes)."""
    return batch[~level_change_mask(batch)]


def series_logs(name: str, series: Mapping[str, tuple[str, ...]]) -> dict[str, layout.Log]:
    """The run-file log of each series `name` reports; ValueError (one line) when one is not
    declared in runfile/layout.py or its attributes do not match the log's columns."""
    logs = {}
    for record, attributes in series.items():
        log_ = layout.SERIES.get(record)
        if log_ is None:
            known = ", ".join(sorted(layout.SERIES))
            raise ValueError(f"{name} series {record!r}: no run-file log declares it ({known})")
        if len(attributes) != len(log_.columns):
            columns = ", ".join(column.name for column in log_.columns)
            raise ValueError(
                f"{name} series {record!r}: {len(attributes)} attributes"
                f" ({', '.join(attributes)}) for the columns of {log_.path} ({columns})"
            )
        logs[record] = log_
    return logs


def series_record(name: str, rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """An instrument's series rows as the event stream's `series` topic carries them:
    `{"name": record, "t": [run s...], <column>: [...]}`, the columns its run-file log
    declares (runfile/layout.py), times on the run clock as the rows come (as analysis
    results', unlike the `bias` and `event` topics' daemon-clock times)."""
    columns = layout.SERIES[name].columns
    payload: dict[str, Any] = {"name": name, "t": [float(row[0]) for row in rows]}
    for index, column in enumerate(columns, start=2):  # after the time and its half-width
        payload[column.name] = [float(row[index]) for row in rows]
    return payload


class RunFileSink(RecordSink):
    """The open run's file, through the ingest process: samples and events shifted to the
    run clock, analysis results as they are (their times are run-clock already)."""

    name = "run file"

    def __init__(self, ingest: IngestClient, current_run: Callable[[], OpenRun | None]) -> None:
        self._ingest = ingest
        self._current_run = current_run
        self.analysis_results_after_run_total = 0

    def on_samples(self, batch: np.ndarray) -> None:
        run = self._current_run()
        if run is not None:  # readings and commanded level changes: the run file keeps both
            shifted = batch.copy()
            shifted["time"] -= run.offset_s
            self._ingest.write_samples(shifted)

    def on_analysis(self, result: dict[str, Any]) -> None:
        if self._current_run() is not None:
            self._ingest.write_analysis(analysis_record(result))
        else:  # a frame of a run that has closed since: published, not in any file
            self.analysis_results_after_run_total += 1

    def on_event(self, event: Event) -> None:
        run = self._current_run()
        if run is not None:
            self._ingest.write_event(
                Event(event.time - run.offset_s, event.kind, event.message, event.data)
            )

    def on_series(self, record: tuple[str, list[tuple[Any, ...]]]) -> None:
        if self._current_run() is None:
            return
        name, rows = record  # (time, half-width, *columns) on the run clock, by their monitor
        if not layout.SERIES[name].time_errors:
            rows = [(row[0], *row[2:]) for row in rows]
        self._ingest.write_series(name, rows)


class AnalysisReferenceSink(RecordSink):
    """The first sample of a run (commanded level or reading) whose setpoint leaves 0 V ends
    the live analysis's expansion reference."""

    name = "analysis reference"

    def __init__(self, analysis: LiveAnalysis, current_run: Callable[[], OpenRun | None]) -> None:
        self._analysis = analysis
        self._current_run = current_run
        self._started_in: OpenRun | None = None  # the run whose bias has left 0 V

    def on_samples(self, batch: np.ndarray) -> None:
        run = self._current_run()
        if run is None or run is self._started_in:
            return
        away = np.flatnonzero(np.abs(batch["setpoint"]) > BIAS_OFF_VOLTS)
        if not len(away):
            return
        self._started_in = run
        self._analysis.bias_started(float(batch["time"][away[0]]) - run.offset_s)


class MetricsSink(RecordSink):
    """The Prometheus metrics (service/metrics.py)."""

    name = "metrics"

    def __init__(self, metrics: DaemonMetrics) -> None:
        self._metrics = metrics

    def on_samples(self, batch: np.ndarray) -> None:
        readings = readings_of(batch)
        if len(readings):
            self._metrics.observe_samples(readings)

    def on_series(self, record: tuple[str, list[tuple[Any, ...]]]) -> None:
        self._metrics.observe_series(*record)

    def on_analysis(self, result: dict[str, Any]) -> None:
        self._metrics.observe_analysis(result["values"], result.get("latency_s"))
        totals = result.get("totals")
        if isinstance(totals, dict):
            self._metrics.observe_analysis_stats(totals)

    def on_status(self, status: dict[str, Any]) -> None:
        self._metrics.observe_ingest_stats(status["ingest"])
        self._metrics.observe_progress(status["protocol"])
        self._metrics.observe_guardian(status["guardian"])
        if status["analysis"] is not None:
            self._metrics.observe_analysis_stats(status["analysis"])


class EventStreamSink(RecordSink):
    """The event stream (PUB; topics `bias`, `analysis`, `event`, `status`, `series`)."""

    name = "event stream"

    def __init__(self, publisher: EventPublisher) -> None:
        self._publisher = publisher

    def on_samples(self, batch: np.ndarray) -> None:
        readings = readings_of(batch)
        if not len(readings):
            return
        last = readings[-1]
        self._publisher.publish(
            "bias",
            {
                "time": float(last["time"]),
                "voltage": float(last["voltage"]),
                "setpoint": float(last["setpoint"]),
                "current": float(last["current"]),
                "samples": len(readings),
            },
        )

    def on_analysis(self, result: dict[str, Any]) -> None:
        self._publisher.publish("analysis", analysis_record(result))

    def on_series(self, record: tuple[str, list[tuple[Any, ...]]]) -> None:
        self._publisher.publish("series", series_record(*record))

    def on_event(self, event: Event) -> None:
        self._publisher.publish("event", event.to_dict())

    def on_ingest_event(self, event: dict[str, Any]) -> None:
        self._publisher.publish("event", event)

    def on_status(self, status: dict[str, Any]) -> None:
        self._publisher.publish("status", status)
