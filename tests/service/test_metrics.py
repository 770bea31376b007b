"""Metrics as Prometheus sees them: scraped over real HTTP and parsed with prometheus_client."""

from __future__ import annotations

import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from insitu_daq.control.runner import RunState
from insitu_daq.core.records import bias_samples
from insitu_daq.ingest.wire import DROP_REASONS, HDF5_WRITE_BUCKETS_S
from insitu_daq.service.api import ControlClient, ControlError
from insitu_daq.service.api.server import ControlServer
from insitu_daq.service.metrics import DaemonMetrics

# DESIGN.md and the issue name these; other programs (dashboards, alerts) rely on them.
CONTRACT_METRICS = {
    "insitu_daq_frames_received_total": "counter",
    "insitu_daq_frames_written_total": "counter",
    "insitu_daq_frames_dropped_total": "counter",
    "insitu_daq_frame_gaps_total": "counter",
    "insitu_daq_malformed_messages_total": "counter",
    "insitu_daq_bias_voltage_volts": "gauge",
    "insitu_daq_bias_setpoint_volts": "gauge",
    "insitu_daq_sample_current_amperes": "gauge",
    "insitu_daq_bias_samples_total": "counter",
    "insitu_daq_hdf5_write_seconds": "histogram",
    "insitu_daq_compliance_trips_total": "counter",
    "insitu_daq_instrument_up": "gauge",
    "insitu_daq_protocol_state": "gauge",
    "insitu_daq_run_elapsed_seconds": "gauge",
    "insitu_daq_d_spacing_meters": "gauge",
}
BASE_UNITS = ("_volts", "_amperes", "_seconds", "_meters", "_meters_per_second", "_bytes", "_ratio")
BASE_UNITS += ("_celsius",)  # Prometheus's base unit of temperature (a heating holder's)
# Electron dose in base units (1 e/A^2 = 1e20 e/m^2), and its rate.
BASE_UNITS += ("_electrons_per_square_meter", "_electrons_per_square_meter_per_second")
# Gauges without a unit: 0/1 flags (`_up`, one-hot `_state`) and `_info` labels.
UNITLESS_SUFFIXES = ("_up", "_state", "_info")


@pytest.fixture
def metrics() -> Iterator[DaemonMetrics]:
    with DaemonMetrics("127.0.0.1", 0) as metrics:
        yield metrics


def scrape(metrics: DaemonMetrics) -> dict[str, list[Sample]]:
    """GET /metrics and parse it as Prometheus does; samples by family name."""
    with urllib.request.urlopen(metrics.url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def families(metrics: DaemonMetrics) -> dict[str, str]:
    """Family name as exposed (counters with `_total`) -> type, from a real scrape."""
    with urllib.request.urlopen(metrics.url, timeout=5) as response:
        text = response.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        exposed = family.name + "_total" if family.type == "counter" else family.name
        found[exposed] = family.type
    return found


def value(samples: dict[str, list[Sample]], family: str, name: str, **labels: str) -> float:
    matches = [s.value for s in samples[family] if s.name == name and s.labels == labels]
    assert len(matches) == 1, f"{name}{labels}: {matches}"
    return matches[0]


def test_endpoint_serves_on_an_ephemeral_port(metrics: DaemonMetrics) -> None:
    assert metrics.port != 0
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", metrics.url)
    assert "insitu_daq_bias_voltage_volts" in scrape(metrics)


def test_contract_metrics_exist_with_their_types(metrics: DaemonMetrics) -> None:
    exposed = families(metrics)
    for name, kind in CONTRACT_METRICS.items():
        assert exposed.get(name) == kind, name


def test_names_follow_the_prometheus_conventions(metrics: DaemonMetrics) -> None:
    metrics.set_instrument_up("source_meter", True)
    metrics.set_d_spacing("003", 4.8e-10)
    for name, kind in families(metrics).items():
        assert name.startswith("insitu_daq_"), name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert not re.search(r"_(milli|micro|nano|kilo|mega)|_ms$|_ns$|_us$|_percent", name), name
        if kind == "counter":
            assert name.endswith("_total"), name
        elif kind == "histogram":
            assert name.endswith(BASE_UNITS), name
        elif kind == "gauge" and not name.endswith("_created"):
            assert name.endswith(BASE_UNITS + UNITLESS_SUFFIXES), name


def test_bias_samples_show_the_newest_values_and_count_all(metrics: DaemonMetrics) -> None:
    first, second = bias_samples(3), bias_samples(2)
    first["voltage"] = [0.10, 0.20, 0.30]
    second["voltage"] = [4.2995, 4.3001]
    second["setpoint"] = 4.3
    second["current"] = [2.1e-9, 2.4e-9]
    metrics.observe_samples(first)
    metrics.observe_samples(bias_samples(0))  # an empty batch changes nothing
    metrics.observe_samples(second)
    metrics.count_trip()
    samples = scrape(metrics)
    assert value(samples, "insitu_daq_bias_voltage_volts", "insitu_daq_bias_voltage_volts") == (
        pytest.approx(4.3001)
    )
    assert value(
        samples, "insitu_daq_bias_setpoint_volts", "insitu_daq_bias_setpoint_volts"
    ) == pytest.approx(4.3)
    assert value(
        samples, "insitu_daq_sample_current_amperes", "insitu_daq_sample_current_amperes"
    ) == pytest.approx(2.4e-9)
    assert value(samples, "insitu_daq_bias_samples", "insitu_daq_bias_samples_total") == 5
    assert value(samples, "insitu_daq_compliance_trips", "insitu_daq_compliance_trips_total") == 1
    assert (
        value(
            samples,
            "insitu_daq_bias_last_sample_timestamp_seconds",
            "insitu_daq_bias_last_sample_timestamp_seconds",
        )
        > 1.6e9
    )


def write_histogram(*durations: float) -> dict:
    """The ingest process's `hdf5_write_seconds` stats entry for these write durations."""
    cumulative = [sum(d <= bound for d in durations) for bound in HDF5_WRITE_BUCKETS_S]
    return {
        "le": list(HDF5_WRITE_BUCKETS_S),
        "cumulative_counts": cumulative,
        "sum": sum(durations),
        "count": len(durations),
    }


def test_cumulative_ingest_stats_become_counter_increments(metrics: DaemonMetrics) -> None:
    received = ("insitu_daq_frames_received", "insitu_daq_frames_received_total")
    dropped = ("insitu_daq_frames_dropped", "insitu_daq_frames_dropped_total")
    metrics.observe_ingest_stats(
        {"pid": 100, "frames_received_total": 10, "frames_dropped_by_reason": {"late": 1}}
    )
    metrics.observe_ingest_stats(
        {"pid": 100, "frames_received_total": 25, "frames_dropped_by_reason": {"late": 1}}
    )
    samples = scrape(metrics)
    assert value(samples, *received) == 25  # not 10 + 25
    assert value(samples, *dropped, reason="late") == 1
    assert value(samples, *dropped, reason="duplicate") == 0  # known reasons exist from the start
    # A counter going down in the same process: taken as a restart, nothing is subtracted.
    metrics.observe_ingest_stats({"pid": 100, "frames_received_total": 5})
    assert value(scrape(metrics), *received) == 30
    metrics.observe_ingest_stats({"pid": 100, "frames_received_total": 9})
    assert value(scrape(metrics), *received) == 34


def test_a_new_ingest_process_counts_from_zero(metrics: DaemonMetrics) -> None:
    received = ("insitu_daq_frames_received", "insitu_daq_frames_received_total")
    records = ("insitu_daq_records_dropped", "insitu_daq_records_dropped_total")
    metrics.observe_ingest_stats(
        {"pid": 100, "alive": True, "frames_received_total": 50, "records_dropped_total": 2}
    )
    # The ingest process was replaced and has already received 60 frames by its first
    # report: all 60 are new, although 60 > 50. The client-side count continues as it was.
    metrics.observe_ingest_stats(
        {"pid": 200, "alive": True, "frames_received_total": 60, "records_dropped_total": 3}
    )
    samples = scrape(metrics)
    assert value(samples, *received) == 110
    assert value(samples, *records) == 3
    assert value(samples, "insitu_daq_ingest_up", "insitu_daq_ingest_up") == 1
    metrics.observe_ingest_stats({"pid": 200, "alive": False})
    assert value(scrape(metrics), "insitu_daq_ingest_up", "insitu_daq_ingest_up") == 0


def test_guardian_liveness_and_restarts_reach_their_metrics(metrics: DaemonMetrics) -> None:
    up = ("insitu_daq_guardian_up", "insitu_daq_guardian_up")
    restarts = ("insitu_daq_guardian_restarts", "insitu_daq_guardian_restarts_total")
    metrics.observe_guardian({"alive": True, "pid": 10, "restarts_total": 0})
    assert value(scrape(metrics), *up) == 1
    metrics.observe_guardian({"alive": False, "pid": 10, "restarts_total": 0})
    assert value(scrape(metrics), *up) == 0  # the InsituDaqGuardianDown alert's expression
    metrics.observe_guardian({"alive": True, "pid": 11, "restarts_total": 1})
    samples = scrape(metrics)
    assert value(samples, *up) == 1 and value(samples, *restarts) == 1


def test_every_ingest_counter_reaches_its_metric(metrics: DaemonMetrics) -> None:
    metrics.observe_ingest_stats(
        {
            "pid": 1,
            "frames_written_total": 7,
            "gaps_total": 2,
            "frames_missing_total": 5,
            "out_of_order_total": 1,
            "malformed_total": 3,
            "frames_dropped_total": 99,  # the sum of the reasons: not counted twice
            "frames_dropped_by_reason": {"stale_series": 4, "write_error": 1},
        }
    )
    samples = scrape(metrics)
    expected = {
        "insitu_daq_frames_written": 7,
        "insitu_daq_frame_gaps": 2,
        "insitu_daq_frames_missing": 5,
        "insitu_daq_frames_out_of_order": 1,
        "insitu_daq_malformed_messages": 3,
    }
    for family, count in expected.items():
        assert value(samples, family, family + "_total") == count
    dropped = {s.labels["reason"]: s.value for s in samples["insitu_daq_frames_dropped"]
               if s.name.endswith("_total")}  # fmt: skip
    assert sum(dropped.values()) == 5
    assert dropped["stale_series"] == 4


def test_unusable_ingest_stats_are_counted_not_applied(metrics: DaemonMetrics) -> None:
    metrics.observe_ingest_stats(
        {
            "frames_written_total": "lots",
            "malformed_total": -1,
            "frames_dropped_by_reason": 4,
            "hdf5_write_seconds": {"le": [0.1], "cumulative_counts": [3], "sum": 1.0, "count": 2},
            "frames_received_total": 3,
            "detector": {"series_id": 4},  # not a metric: ignored quietly
        }
    )
    assert metrics.ignored_stats_total == 4
    samples = scrape(metrics)
    assert value(samples, "insitu_daq_frames_received", "insitu_daq_frames_received_total") == 3
    assert value(samples, "insitu_daq_frames_written", "insitu_daq_frames_written_total") == 0


def test_write_latency_histogram_mirrors_the_ingest_process(metrics: DaemonMetrics) -> None:
    writes = [0.0008, 0.0009, 0.004]
    metrics.observe_ingest_stats({"pid": 1, "hdf5_write_seconds": write_histogram(*writes)})
    writes += [0.3, 10.0]  # the last one beyond every bucket
    metrics.observe_ingest_stats({"pid": 1, "hdf5_write_seconds": write_histogram(*writes)})
    metrics.observe_ingest_stats({"pid": 1, "hdf5_write_seconds": write_histogram(*writes)})
    samples = scrape(metrics)
    family = "insitu_daq_hdf5_write_seconds"
    assert value(samples, family, family + "_count") == 5
    assert value(samples, family, family + "_sum") == pytest.approx(10.3057)
    assert value(samples, family, family + "_bucket", le="0.001") == 2
    assert value(samples, family, family + "_bucket", le="0.005") == 3
    assert value(samples, family, family + "_bucket", le="1.0") == 4
    assert value(samples, family, family + "_bucket", le="+Inf") == 5
    buckets = [s.value for s in samples[family] if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets) and len(buckets) == len(HDF5_WRITE_BUCKETS_S) + 1
    # A new ingest process: its first snapshot is all new.
    metrics.observe_ingest_stats({"pid": 2, "hdf5_write_seconds": write_histogram(0.002)})
    assert value(scrape(metrics), family, family + "_count") == 6


def test_every_ingest_drop_reason_and_write_bucket_is_exposed_from_the_start(
    metrics: DaemonMetrics,
) -> None:
    """The ingest wire's names, exposed before any frame: rate() sees the first increase."""
    samples = scrape(metrics)
    dropped = {s.labels["reason"]: s.value for s in samples["insitu_daq_frames_dropped"]}
    assert dropped == dict.fromkeys(DROP_REASONS, 0.0)
    family = "insitu_daq_hdf5_write_seconds"
    bounds = [s.labels["le"] for s in samples[family] if s.name.endswith("_bucket")]
    assert [float(b) for b in bounds[:-1]] == list(HDF5_WRITE_BUCKETS_S) and bounds[-1] == "+Inf"


def test_protocol_state_is_one_hot(metrics: DaemonMetrics) -> None:
    def current() -> list[str]:
        samples = scrape(metrics)["insitu_daq_protocol_state"]
        return [s.labels["state"] for s in samples if s.value == 1]

    assert current() == ["idle"]
    metrics.set_protocol_state(RunState.RUNNING)
    assert current() == ["running"]
    metrics.observe_progress({"state": "paused", "run_elapsed_s": 42.5})
    assert current() == ["paused"]
    metrics.set_protocol_state("calibrating")  # a state added later still shows
    assert current() == ["calibrating"]
    samples = scrape(metrics)
    assert value(samples, "insitu_daq_run_elapsed_seconds", "insitu_daq_run_elapsed_seconds") == (
        42.5
    )


def test_instrument_up_and_d_spacing_series(metrics: DaemonMetrics) -> None:
    metrics.set_instrument_up("source_meter", True)
    metrics.set_instrument_up("holder", False)
    metrics.set_d_spacing("003", 4.79e-10)
    metrics.set_d_spacing("NiO_200", 2.09e-10)
    samples = scrape(metrics)
    up = ("insitu_daq_instrument_up", "insitu_daq_instrument_up")
    assert value(samples, *up, instrument="source_meter") == 1
    assert value(samples, *up, instrument="holder") == 0
    assert value(
        samples, "insitu_daq_d_spacing_meters", "insitu_daq_d_spacing_meters", reflection="003"
    ) == pytest.approx(4.79e-10)
    metrics.set_d_spacing("003", None)  # not measurable any more: the series goes away
    reflections = [s.labels["reflection"] for s in scrape(metrics)["insitu_daq_d_spacing_meters"]]
    assert reflections == ["NiO_200"]


def test_control_api_outcomes_are_exposed(metrics: DaemonMetrics) -> None:
    class Handler:
        def handle_ping(self) -> dict:
            return {}

        def handle_status(self) -> dict:
            raise RuntimeError("not now")

    with ControlServer("tcp://127.0.0.1:*", Handler()) as server:  # type: ignore[arg-type]
        metrics.watch_control(server.stats)
        with ControlClient(server.endpoint, timeout_s=5.0) as client:
            client.request("ping")
            with pytest.raises(ControlError):
                client.request("status")
            with pytest.raises(ControlError):
                client.request("warp")
        samples = scrape(metrics)
    family = ("insitu_daq_control_requests", "insitu_daq_control_requests_total")
    assert value(samples, *family, outcome="ok") == 1
    assert value(samples, *family, outcome="failed") == 1
    assert value(samples, *family, outcome="refused") == 1


def test_two_instances_do_not_share_a_registry() -> None:
    with DaemonMetrics("127.0.0.1", 0) as one, DaemonMetrics("127.0.0.1", 0) as two:
        one.count_trip()
        trips = ("insitu_daq_compliance_trips", "insitu_daq_compliance_trips_total")
        assert value(scrape(one), *trips) == 1
        assert value(scrape(two), *trips) == 0


def test_stop_closes_the_port_and_joins_the_thread() -> None:
    metrics = DaemonMetrics("127.0.0.1", 0)
    before = set(threading.enumerate())
    metrics.start()
    url = metrics.url
    metrics.stop()
    metrics.stop()  # idempotent
    assert set(threading.enumerate()) <= before
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


def test_live_analysis_results_become_gauges_in_base_units_and_counters() -> None:
    metrics = DaemonMetrics("127.0.0.1", 0)
    value = metrics.registry.get_sample_value
    metrics.observe_analysis(
        {
            "d_spacing_m.nio_200": 2.1e-10,
            "rock_salt_fraction": 0.4,
            "rock_salt_presence": 0.55,
            "front_velocity_nm_s": 5.0,
            "expansion": 0.2,
        },
        latency_s=0.03,
    )
    assert value("insitu_daq_d_spacing_meters", {"reflection": "nio_200"}) == 2.1e-10
    assert value("insitu_daq_phase_fraction_ratio", {"phase": "rock_salt"}) == 0.4
    assert value("insitu_daq_phase_presence_ratio", {"phase": "rock_salt"}) == 0.55
    assert value("insitu_daq_front_velocity_meters_per_second") == pytest.approx(5e-9)
    assert value("insitu_daq_expansion_ratio") == 0.2
    assert value("insitu_daq_analysis_latency_seconds_count") == 1
    # Not measurable any more: the labelled series goes, the unlabelled gauge reads NaN.
    metrics.observe_analysis({"d_spacing_m.nio_200": None, "expansion": None}, None)
    assert value("insitu_daq_d_spacing_meters", {"reflection": "nio_200"}) is None
    assert value("insitu_daq_expansion_ratio") != value("insitu_daq_expansion_ratio")  # NaN
    # Cumulative process counters become deltas; a new pid counts afresh.
    metrics.observe_analysis_stats(
        {"pid": 1, "frames_analysed_total": 5, "frames_skipped_total": 2}
    )
    metrics.observe_analysis_stats(
        {"pid": 1, "frames_analysed_total": 8, "frames_skipped_total": 2}
    )
    metrics.observe_analysis_stats({"pid": 2, "frames_analysed_total": 1, "alive": True})
    assert value("insitu_daq_analysis_frames_total") == 9
    assert value("insitu_daq_analysis_frames_skipped_total", {"reason": "behind"}) == 2
    assert value("insitu_daq_analysis_up") == 1
