"""Prometheus metrics of the daemon, served at http://127.0.0.1:9105/metrics (DESIGN.md).

Names: prefix `insitu_daq_`, base units in the name (`_volts`, `_amperes`, `_seconds`,
`_meters`, `_bytes`), counters end in `_total`. The deploy files (alert rules, Grafana
dashboard) use these names; tests/service/test_deploy_files.py checks them against this registry.

The metrics live in a private CollectorRegistry, not prometheus_client's global one, so two
daemons (or tests) in one process never collide, and the HTTP server is one we can stop.

The daemon calls `DaemonMetrics` methods from its threads. The ingest runs in another process
and reports cumulative counters in its stats dict (`IngestClient.stats()`, passed to
`observe_ingest_stats`); they become Prometheus counters by adding what grew since the last
report. When the ingest process is replaced (a new `pid`, or a counter that went down) its
values count from zero again, so a Prometheus counter never goes down. The write-latency
histogram arrives the same way (`le`, `cumulative_counts`, `sum`, `count`) and is merged by
bucket deltas.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import Enum
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from insitu_daq import __version__
from insitu_daq.analysis.quantities import D_SPACING, find, registered
from insitu_daq.control.runner import RunState
from insitu_daq.ingest.failure import KINDS as FAILURE_KINDS
from insitu_daq.ingest.wire import DROP_REASONS, HDF5_WRITE_BUCKETS_S
from insitu_daq.runfile.layout import TEMPERATURE

log = logging.getLogger(__name__)

PREFIX = "insitu_daq_"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9105

# Series that exist from the start, so rate() sees their first increase.
PROTOCOL_STATES = tuple(state.value for state in RunState)

# Live analysis: latency buckets (s), and why a frame was not analysed. From the analysis
# process's cumulative stats: "behind" (a newer frame was queued), "settling" (within a mode
# switch), "no_state" (imaging mode unknown), "malformed", "error"; from the ingest's:
# "tap_full" (the tap's queue was full, the frame was never offered), "ingest_busy" (withheld
# while the ingest was behind the detector: it has priority, ingest/tap.py).
ANALYSIS_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
                            2.5)  # fmt: skip
ANALYSIS_SKIP_REASONS = (
    "behind", "settling", "no_state", "state_late", "malformed", "error", "tap_full",
    "ingest_busy",
)  # fmt: skip
ANALYSIS_COUNTERS = {
    "frames_analysed_total": None,
    "frames_skipped_total": "behind",
    "frames_settling_total": "settling",
    "frames_no_state_total": "no_state",
    "frames_state_late_total": "state_late",  # held for its imaging state too long
    "malformed_total": "malformed",
    "errors_total": "error",
}
# Ingest stats key -> analysis skip reason: the tap's offers that never reached the analysis.
INGEST_TAP_COUNTERS = {
    "analysis_offers_skipped": "tap_full",
    "analysis_offers_withheld": "ingest_busy",
}
# Why the run file stopped taking writes (recording_failure.KINDS).
RECORDING_FAILURE_KINDS = FAILURE_KINDS

# Ingest stats key -> DaemonMetrics counter attribute. Cumulative, as the ingest reports them.
INGEST_COUNTERS = {
    "frames_received_total": "frames_received",
    "frames_written_total": "frames_written",
    "gaps_total": "frame_gaps",
    "frames_missing_total": "frames_missing",
    "out_of_order_total": "frames_out_of_order",
    "malformed_total": "malformed_messages",
    "records_dropped_total": "records_dropped",
}
# Counted by the daemon's IngestClient, not the ingest process: they outlive a new pid.
INGEST_CLIENT_COUNTERS = ("records_dropped_total",)
INGEST_DROPPED_BY_REASON = "frames_dropped_by_reason"  # {reason: cumulative count}
INGEST_WRITE_SECONDS = "hdf5_write_seconds"  # {le, cumulative_counts, sum, count}
INGEST_ALIVE = "alive"
INGEST_PID = "pid"


class _MirroredHistogram(Collector):
    """A Prometheus histogram fed by another process's cumulative histogram snapshots
    (prometheus_client's Histogram can only observe values one by one)."""

    def __init__(self, name: str, documentation: str, bounds: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # per bucket, the last one above all bounds
        self._sum = 0.0
        self._lock = threading.Lock()
        self._last: tuple[list[int], float] | None = None

    def forget_source(self) -> None:
        """The source restarted: its next snapshot counts from zero."""
        with self._lock:
            self._last = None

    def merge_snapshot(self, snapshot: Mapping[str, Any]) -> None:
        """Add what a cumulative snapshot {le, cumulative_counts, sum, count} gained."""
        bounds = [float(b) for b in snapshot["le"]]
        cumulative = [int(c) for c in snapshot["cumulative_counts"]]
        count, total = int(snapshot["count"]), float(snapshot["sum"])
        if len(cumulative) != len(bounds) or cumulative != sorted(cumulative):
            raise ValueError("cumulative_counts must rise and match le")
        if (cumulative[-1] if cumulative else 0) > count or not math.isfinite(total):
            raise ValueError("count is below the last bucket or sum is not finite")
        per_bucket = np.diff([0, *cumulative, count]).tolist()  # the last: above every bound
        with self._lock:
            last = self._last
            if last is None or len(last[0]) != len(per_bucket) or count < sum(last[0]):
                if last is not None:
                    log.info("%s: source histogram went down; counting it afresh", self.name)
                last = ([0] * len(per_bucket), 0.0)
            self._last = (per_bucket, total)
            for i, (now, before) in enumerate(zip(per_bucket, last[0], strict=True)):
                # Re-bin by upper bound, so a source with other bounds still lands conservatively.
                upper = bounds[i] if i < len(bounds) else math.inf
                self._counts[bisect.bisect_left(self.bounds, upper)] += max(0, now - before)
            self._sum += max(0.0, total - last[1])

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative = np.cumsum(counts).tolist()  # the last entry is the +Inf bucket
        bounds = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        buckets = list(zip(bounds, cumulative, strict=True))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)

    def describe(self) -> Iterable[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation)


class _CallbackCounters(Collector):
    """Counters read at scrape time from a function returning {label value: count}."""

    def __init__(
        self, name: str, documentation: str, label: str, read: Callable[[], Mapping[str, int]]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.read = read

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        try:
            for value, count in self.read().items():
                family.add_metric([value], count)
        except Exception:
            log.exception("%s: reading counters failed", self.name)
        yield family

    def describe(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=[self.label])


class DaemonMetrics:
    """Every metric of the daemon, in a private registry, plus the HTTP server that serves it.

    `start()` serves `/metrics` on (host, port); port 0 picks a free port (read `port`/`url`).
    """

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        self.host = host
        self._requested_port = port
        self.registry = CollectorRegistry()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the cumulative-to-delta state
        self._last_cumulative: dict[tuple[str, str], float] = {}
        self._ingest_pid: object = None
        self.ignored_stats_total = 0  # ingest stats values that were not usable numbers
        self._warned_keys: set[str] = set()
        r = self.registry

        Info(f"{PREFIX}build", "insitu-daq version", registry=r).info({"version": __version__})
        # Frames (from the ingest process's cumulative stats).
        self.frames_received = Counter(
            f"{PREFIX}frames_received_total", "Stream V2 image messages received", registry=r
        )
        self.frames_written = Counter(
            f"{PREFIX}frames_written_total", "frames written to the run file", registry=r
        )
        self.frames_dropped = Counter(
            f"{PREFIX}frames_dropped_total",
            "frames received but not written, by reason",
            ["reason"],
            registry=r,
        )
        for reason in DROP_REASONS:
            self.frames_dropped.labels(reason)
        self.frame_gaps = Counter(
            f"{PREFIX}frame_gaps_total", "gaps in image_id (runs of missing frames)", registry=r
        )
        self.frames_missing = Counter(
            f"{PREFIX}frames_missing_total", "image_id values never received", registry=r
        )
        self.frames_out_of_order = Counter(
            f"{PREFIX}frames_out_of_order_total",
            "frames received out of image_id order",
            registry=r,
        )
        self.malformed_messages = Counter(
            f"{PREFIX}malformed_messages_total",
            "Stream V2 messages that did not decode",
            registry=r,
        )
        self.records_dropped = Counter(
            f"{PREFIX}records_dropped_total",
            "bias samples, events and positions that did not reach the run file's writer",
            registry=r,
        )
        self.hdf5_write_seconds = _MirroredHistogram(
            f"{PREFIX}hdf5_write_seconds",
            "time of one write into the run file",
            HDF5_WRITE_BUCKETS_S,  # the ingest process's buckets, whose histogram this mirrors
        )
        r.register(self.hdf5_write_seconds)
        self.ingest_up = Gauge(
            f"{PREFIX}ingest_up", "1 while the ingest (run file writer) process runs", registry=r
        )
        self.guardian_up = Gauge(
            f"{PREFIX}guardian_up",
            "1 while the bias guardian (makes the bias safe if the daemon dies) runs",
            registry=r,
        )
        self.guardian_restarts = Counter(
            f"{PREFIX}guardian_restarts_total",
            "bias guardians replaced after exiting while the daemon ran",
            registry=r,
        )
        self._guardian_restarts_seen = 0
        # The data disk (issue 9): room left, and what a recording fails of.
        self.data_disk_free = Gauge(
            f"{PREFIX}data_disk_free_bytes",
            "free space on the data folder's file system (for this user)",
            registry=r,
        )
        self.data_disk_size = Gauge(
            f"{PREFIX}data_disk_size_bytes", "size of the data folder's file system", registry=r
        )
        self.data_dir_up = Gauge(
            f"{PREFIX}data_dir_up",
            "1 if the data folder exists and is writable, 0 if a run would be refused",
            registry=r,
        )
        self.data_disk_recording_capacity = Gauge(
            f"{PREFIX}data_disk_recording_capacity_seconds",
            "how long the free space holds a recording at the detector's current rate",
            registry=r,
        )
        self.recording_failures = Counter(
            f"{PREFIX}recording_failures_total",
            "runs whose file stopped taking writes mid-run, by kind",
            ["kind"],
            registry=r,
        )
        for kind in RECORDING_FAILURE_KINDS:
            self.recording_failures.labels(kind)
        # Bias.
        self.bias_voltage = Gauge(
            f"{PREFIX}bias_voltage_volts", "measured bias voltage (newest sample)", registry=r
        )
        self.bias_setpoint = Gauge(
            f"{PREFIX}bias_setpoint_volts", "bias voltage setpoint (newest sample)", registry=r
        )
        self.sample_current = Gauge(
            f"{PREFIX}sample_current_amperes", "current through the sample (newest)", registry=r
        )
        # A heating holder's chip (its series on the record bus), labelled so that a station
        # without one shows no series rather than a made-up 0 C.
        self.temperature = Gauge(
            f"{PREFIX}temperature_celsius",
            "heating chip temperature (newest reading)",
            ["sensor"],
            registry=r,
        )
        self.temperature_setpoint = Gauge(
            f"{PREFIX}temperature_setpoint_celsius",
            "heating controller's ramping setpoint (newest reading)",
            ["sensor"],
            registry=r,
        )
        self.bias_samples = Counter(
            f"{PREFIX}bias_samples_total", "bias/current samples taken", registry=r
        )
        self.bias_last_sample = Gauge(
            f"{PREFIX}bias_last_sample_timestamp_seconds",
            "wall time (Unix seconds) the newest bias sample arrived",
            registry=r,
        )
        self.compliance_trips = Counter(
            f"{PREFIX}compliance_trips_total", "current compliance trips", registry=r
        )
        # Instruments and protocol.
        self.instrument_up = Gauge(
            f"{PREFIX}instrument_up",
            "1 if the instrument answers, 0 if it is lost",
            ["instrument"],
            registry=r,
        )
        self.protocol_state = Gauge(
            f"{PREFIX}protocol_state",
            "1 for the protocol runner's current state, 0 for the others",
            ["state"],
            registry=r,
        )
        self._protocol_states: list[str] = []
        for state in PROTOCOL_STATES:
            self._add_protocol_state(state)
        self.set_protocol_state("idle")
        self.run_elapsed = Gauge(
            f"{PREFIX}run_elapsed_seconds",
            "run-clock seconds since the current (or last) run started",
            registry=r,
        )
        # Live analysis (issue 4): one gauge per declared quantity with a metric
        # (analysis/quantities.py), by result key; a family's is labelled by its member.
        # Gauges show the newest value; a quantity that is not measurable has no series (an
        # absent series, not a made-up number).
        self.analysis_gauges: dict[str, Gauge] = {}
        for quantity in registered():
            if quantity.metric is not None:
                self.analysis_gauges[quantity.key] = Gauge(
                    f"{PREFIX}{quantity.metric.name}",
                    quantity.metric.help,
                    [quantity.per] if quantity.per else [],
                    registry=r,
                )
        self.analysis_latency = Histogram(
            f"{PREFIX}analysis_latency_seconds",
            "frame arrival at the ingest to its analysis result at the daemon",
            buckets=ANALYSIS_LATENCY_BUCKETS,
            registry=r,
        )
        self.analysis_frames = Counter(
            f"{PREFIX}analysis_frames_total", "frames analysed live", registry=r
        )
        self.analysis_skipped = Counter(
            f"{PREFIX}analysis_frames_skipped_total",
            "frames the live analysis did not analyse, by reason",
            ["reason"],
            registry=r,
        )
        for reason in ANALYSIS_SKIP_REASONS:
            self.analysis_skipped.labels(reason)
        self.analysis_up = Gauge(
            f"{PREFIX}analysis_up", "1 while the live analysis process runs", registry=r
        )
        # Electron dose (service/dose.py), in base units: 1 e/A^2 = 1e20 e/m^2.
        self.dose_field = Gauge(
            f"{PREFIX}dose_field_electrons_per_square_meter",
            "highest dose in the field being imaged (its region), this run",
            registry=r,
        )
        self.dose_highest = Gauge(
            f"{PREFIX}dose_max_electrons_per_square_meter",
            "highest dose in any region of the specimen, this run",
            registry=r,
        )
        self.dose_budget = Gauge(
            f"{PREFIX}dose_budget_electrons_per_square_meter",
            "dose budget per region now (lower above [dose] hot_above_celsius)",
            registry=r,
        )
        self.dose_rate = Gauge(
            f"{PREFIX}dose_rate_electrons_per_square_meter_per_second",
            "dose rate at the specimen now (0 with the beam blanked)",
            registry=r,
        )
        self.dose_budgets_reached = Counter(
            f"{PREFIX}dose_budget_reached_total",
            "regions that reached their dose budget (the beam was blanked)",
            registry=r,
        )
        self._analysis_pid: object = None
        self._analysis_last: dict[str, float] = {}

    # ----- HTTP ------------------------------------------------------------------------------
    def start(self) -> None:
        """Serve /metrics in a thread; errors (port in use) raise here."""
        if self._server is not None:
            raise RuntimeError("metrics server already started")
        try:
            self._server, self._thread = start_http_server(
                self._requested_port, addr=self.host, registry=self.registry
            )
        except OSError as exc:
            raise OSError(
                f"cannot serve metrics on {self.host}:{self._requested_port}: {exc.strerror}"
            ) from None
        log.info("metrics on %s", self.url)

    def stop(self) -> None:
        """Stop the HTTP server and join its thread. Idempotent."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    @property
    def port(self) -> int:
        """The bound port once started (port 0 resolved), else the configured one."""
        return self._server.server_port if self._server is not None else self._requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def __enter__(self) -> DaemonMetrics:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ----- bias ------------------------------------------------------------------------------
    def observe_samples(self, batch: np.ndarray) -> None:
        """A batch of BIAS_SAMPLE_DTYPE samples: gauges show the newest, the counter counts all."""
        if len(batch) == 0:
            return
        newest = batch[-1]
        self.bias_voltage.set(float(newest["voltage"]))
        self.bias_setpoint.set(float(newest["setpoint"]))
        self.sample_current.set(float(newest["current"]))
        self.bias_samples.inc(len(batch))
        self.bias_last_sample.set(time.time())

    def observe_series(self, name: str, rows: Sequence[Sequence[Any]]) -> None:
        """An instrument's series rows (time, half-width, *columns): the newest of those with
        a metric (a heating holder's temperature; its heater power has no Prometheus base unit,
        watts not being one, and stays in the run file)."""
        if not rows or name != TEMPERATURE.record:
            return
        newest = rows[-1]
        self.temperature.labels("chip").set(float(newest[2]))
        self.temperature_setpoint.labels("chip").set(float(newest[3]))

    def count_trip(self) -> None:
        self.compliance_trips.inc()

    # ----- data disk -------------------------------------------------------------------------
    def observe_data_disk(
        self, free_bytes: int | None, size_bytes: int | None, writable: bool, bytes_per_s: float
    ) -> None:
        """The data folder's file system (None figures: the folder is not there: NaN) and the
        recording's bytes per second (recording_plan.RecordingRate)."""
        self.data_disk_free.set(math.nan if free_bytes is None else free_bytes)
        self.data_disk_size.set(math.nan if size_bytes is None else size_bytes)
        self.data_dir_up.set(1 if writable else 0)
        capacity = math.nan if free_bytes is None or bytes_per_s <= 0 else free_bytes / bytes_per_s
        self.data_disk_recording_capacity.set(capacity)

    def count_recording_failure(self, kind: str) -> None:
        self.recording_failures.labels(kind).inc()

    # ----- dose ------------------------------------------------------------------------------
    def observe_dose(self, status: Mapping[str, float]) -> None:
        """service/dose.py's status (e/A^2): gauges in e/m^2 (NaN: not known)."""
        per_m2 = 1e20
        self.dose_field.set(status["field_e_per_a2"] * per_m2)
        self.dose_highest.set(status["highest_e_per_a2"] * per_m2)
        self.dose_budget.set(status["budget_e_per_a2"] * per_m2)
        self.dose_rate.set(status["dose_rate_e_per_a2_s"] * per_m2)

    def count_dose_budget_reached(self) -> None:
        self.dose_budgets_reached.inc()

    # ----- instruments and protocol ----------------------------------------------------------
    def observe_guardian(self, guardian: dict[str, Any]) -> None:
        """The `guardian` part of the daemon's status."""
        self.guardian_up.set(1 if guardian.get("alive") else 0)
        restarts = int(guardian.get("restarts_total", 0))
        if restarts > self._guardian_restarts_seen:
            self.guardian_restarts.inc(restarts - self._guardian_restarts_seen)
            self._guardian_restarts_seen = restarts

    def set_instrument_up(self, name: str, up: bool) -> None:
        self.instrument_up.labels(name).set(1 if up else 0)

    def _add_protocol_state(self, state: str) -> None:
        self._protocol_states.append(state)
        self.protocol_state.labels(state).set(0)

    def set_protocol_state(self, state: str | Enum) -> None:
        """Mark `state` (a string or a str-valued Enum such as RunState) as the current one."""
        name = str(state.value if isinstance(state, Enum) else state)
        with self._lock:
            if name not in self._protocol_states:
                log.info("new protocol state %r in metrics", name)
                self._add_protocol_state(name)
            for known in self._protocol_states:
                self.protocol_state.labels(known).set(1 if known == name else 0)

    def set_run_elapsed(self, seconds: float) -> None:
        self.run_elapsed.set(seconds)

    def observe_progress(self, progress: Mapping[str, Any]) -> None:
        """A runner Progress.to_dict(): its `state` and `run_elapsed_s`."""
        if "state" in progress:
            self.set_protocol_state(progress["state"])
        if progress.get("run_elapsed_s") is not None:
            self.set_run_elapsed(float(progress["run_elapsed_s"]))

    # ----- analysis --------------------------------------------------------------------------
    def set_d_spacing(self, reflection: str, meters: float | None) -> None:
        """The measured d of a reflection; None (not measurable) removes its series."""
        self.observe_analysis({D_SPACING.key_for(reflection): meters}, None)

    def observe_analysis(self, values: Mapping[str, Any], latency_s: float | None) -> None:
        """One live result's values (analysis/quantities.py keys): gauges in base units; a
        value that is None (not measurable) removes its series."""
        for key, value in values.items():
            found = find(key)
            if found is None or found[0].metric is None:
                continue
            quantity, member = found
            gauge = self.analysis_gauges.get(quantity.key)
            if gauge is None:  # declared after this registry was built
                continue
            scaled = _scaled(value, quantity.metric.scale)
            self._set_or_remove(gauge, scaled, *((member,) if quantity.per else ()))
        if latency_s is not None and math.isfinite(latency_s) and latency_s >= 0:
            self.analysis_latency.observe(latency_s)

    def _set_or_remove(self, gauge: Any, value: Any, *labels: str) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
        if labels:
            if ok:
                gauge.labels(*labels).set(value)
            else:
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
            return
        # An unlabelled gauge cannot be removed: NaN says "not measurable" in Prometheus.
        gauge.set(value if ok else math.nan)

    def observe_analysis_stats(self, stats: Mapping[str, Any]) -> None:
        """The analysis process's cumulative counters (LiveAnalysis.stats()): deltas into the
        Prometheus counters; a new pid counts from zero."""
        with self._lock:
            if "alive" in stats:
                self.analysis_up.set(1 if stats["alive"] else 0)
            pid = stats.get("pid")
            if pid is not None and pid != self._analysis_pid:
                self._analysis_pid = pid
                self._analysis_last = {}
            for key, reason in ANALYSIS_COUNTERS.items():
                value = stats.get(key)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                last = self._analysis_last.get(key, 0.0)
                self._analysis_last[key] = float(value)
                delta = value - last if value >= last else value
                counter = self.analysis_frames if reason is None else self.analysis_skipped
                if reason is not None:
                    counter = counter.labels(reason)
                counter.inc(max(0.0, delta))

    # ----- other sources ---------------------------------------------------------------------
    def watch_control(self, read: Callable[[], Mapping[str, int]]) -> None:
        """Expose the control server's counters (ControlServer.stats) at scrape time as
        insitu_daq_control_requests_total{outcome=ok|refused|failed}."""
        self.registry.register(
            _CallbackCounters(
                f"{PREFIX}control_requests",
                "control API requests: ok, refused (invalid request), failed (handler error)",
                "outcome",
                read,
            )
        )

    def observe_ingest_stats(self, stats: Mapping[str, Any]) -> None:
        """The ingest process's stats (IngestClient.stats()), turned into metric updates.

        Used keys: INGEST_COUNTERS (cumulative numbers), `frames_dropped_by_reason`
        ({reason: cumulative number}), `hdf5_write_seconds` (a cumulative histogram),
        `alive` and `pid` (a new pid means a new process: its counters start from zero).
        Others are not metrics. Unusable values are logged and counted in
        `ignored_stats_total`; the rest of the stats still apply.
        """
        with self._lock:
            pid = stats.get(INGEST_PID)
            if pid is not None and pid != self._ingest_pid:
                if self._ingest_pid is not None:
                    log.info("ingest process is now pid %s: its counters start afresh", pid)
                    self._last_cumulative = {
                        key: value
                        for key, value in self._last_cumulative.items()
                        if key[0] in INGEST_CLIENT_COUNTERS
                    }
                    self.hdf5_write_seconds.forget_source()
                self._ingest_pid = pid
            if INGEST_ALIVE in stats:
                self.ingest_up.set(1 if stats[INGEST_ALIVE] else 0)
            for key, attribute in INGEST_COUNTERS.items():
                if key in stats:
                    self._add(getattr(self, attribute), key, stats[key])
            by_reason = stats.get(INGEST_DROPPED_BY_REASON)
            if isinstance(by_reason, Mapping):
                for reason, count in by_reason.items():
                    counter = self.frames_dropped.labels(str(reason))
                    self._add(counter, INGEST_DROPPED_BY_REASON, count, label=str(reason))
            elif by_reason is not None:
                self._ignore(INGEST_DROPPED_BY_REASON, "not a mapping of reason to count")
            for key, reason in INGEST_TAP_COUNTERS.items():
                if key in stats:
                    self._add(self.analysis_skipped.labels(reason), key, stats[key])
            snapshot = stats.get(INGEST_WRITE_SECONDS)
            if snapshot is not None:
                try:
                    self.hdf5_write_seconds.merge_snapshot(snapshot)
                except (TypeError, ValueError, KeyError) as exc:
                    self._ignore(INGEST_WRITE_SECONDS, exc)

    def _add(self, counter: Any, key: str, cumulative: Any, label: str = "") -> None:
        """Increase `counter` by what the cumulative value grew since its last report."""
        try:
            counter.inc(self._delta((key, label), cumulative))
        except (TypeError, ValueError) as exc:
            self._ignore(key, exc)

    def _ignore(self, key: str, reason: object) -> None:
        self.ignored_stats_total += 1
        # Stats come every status period: warn once per key, not twice a second.
        level = logging.DEBUG if key in self._warned_keys else logging.WARNING
        self._warned_keys.add(key)
        log.log(level, "ingest stats %r not usable: %s", key, reason)

    def _delta(self, key: tuple[str, str], cumulative: Any) -> float:
        """How much a cumulative counter grew since its last report (a drop = a restart)."""
        if isinstance(cumulative, bool) or not isinstance(cumulative, (int, float, np.number)):
            raise TypeError(f"expected a number, got {type(cumulative).__name__}")
        value = float(cumulative)
        if not math.isfinite(value) or value < 0:
            raise ValueError("a cumulative counter must be a finite number >= 0")
        last = self._last_cumulative.get(key, 0.0)
        self._last_cumulative[key] = value
        if value < last:
            log.info("ingest counter %s went from %g to %g: source restarted", key, last, value)
            return value
        return value - last


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return value * factor
