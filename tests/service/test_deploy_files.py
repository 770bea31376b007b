"""The deploy files parse, and they name only metrics and labels the daemon really exports.

Alert rules and the dashboard are PromQL over metric names; nothing but this test stops a
renamed metric from silently blanking a panel or disarming an alert.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from insitu_daq.app.cli import build_parser
from insitu_daq.core.config import load_config
from insitu_daq.core.stationlock import SHARED_LOCK_DIR
from insitu_daq.service.metrics import DaemonMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC_NAME = re.compile(r"\binsitu_daq_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(insitu_daq_[a-z0-9_]+)\{([^}]*)\}")
LABEL_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "info": ("_info",),
}


def exported_metrics() -> dict[str, set[str]]:
    """Every sample name the daemon can export -> its label names (with every labelled
    family given a series, so its labels show)."""
    metrics = DaemonMetrics("127.0.0.1", 0)  # never started: only its registry is read
    metrics.set_instrument_up("source_meter", True)
    metrics.set_d_spacing("003", 4.8e-10)
    metrics.observe_analysis(
        {
            "intensity.lno_003": 0.02,
            "rock_salt_fraction": 0.5,
            "rock_salt_presence": 0.6,
            "expansion": 0.1,
        },
        0.02,
    )
    metrics.watch_control(lambda: {"ok": 1})
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        labels = {label for sample in family.samples for label in sample.labels}
        for suffix in SAMPLE_SUFFIXES[family.type]:
            names[family.name + suffix] = labels - {"le"} | (
                {"le"} if suffix == "_bucket" else set()
            )
    return names


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    return exported_metrics()


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "prometheus.yml").read_text())


@pytest.fixture(scope="module")
def scrape_job(prometheus: dict[str, Any]) -> dict[str, Any]:
    jobs = [job for job in prometheus["scrape_configs"] if job["job_name"] == "insitu-daq"]
    assert len(jobs) == 1
    return jobs[0]


@pytest.fixture(scope="module")
def target_labels(scrape_job: dict[str, Any]) -> set[str]:
    """Labels every series gets from Prometheus: job, instance and the static ones."""
    static = {
        label for config in scrape_job["static_configs"] for label in config.get("labels", {})
    }
    return {"job", "instance"} | static


def check_promql(expr: str, exported: dict[str, set[str]], target_labels: set[str]) -> set[str]:
    """Assert every metric and selector label in `expr` exists; the labels the result can have."""
    names = set(METRIC_NAME.findall(expr))
    unknown = names - exported.keys()
    assert not unknown, f"{sorted(unknown)} not exported by insitu_daq/service/metrics.py: {expr}"
    for metric, matchers in SELECTOR.findall(expr):
        for label in LABEL_MATCHER.findall(matchers):
            assert label in exported[metric] | target_labels, f"{metric} has no label {label}"
    available = set(target_labels)
    for name in names:
        available |= exported[name]
    for grouping in GROUPING.findall(expr):
        available |= {label.strip() for label in grouping.split(",") if label.strip()}
    return available


# ----- Prometheus --------------------------------------------------------------------------
def test_scrape_config_targets_the_daemons_metrics_port(
    prometheus: dict[str, Any], scrape_job: dict[str, Any]
) -> None:
    api = load_config(DEPLOY / "station.example.toml").api
    targets = [t for config in scrape_job["static_configs"] for t in config["targets"]]
    assert targets == [f"{api.metrics_host}:{api.metrics_port}"] == ["127.0.0.1:9105"]
    assert scrape_job.get("metrics_path", "/metrics") == "/metrics"
    for rule_file in prometheus["rule_files"]:
        assert (DEPLOY / rule_file).is_file(), rule_file


ALERT_RULES = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
RULES = [rule for group in ALERT_RULES["groups"] for rule in group["rules"]]


def test_required_alerts_are_there() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in RULES}
    assert len(exprs) == len(RULES), "alert names must be unique"
    required = {
        "compliance_trips_total": "a compliance trip",
        "instrument_up": "an instrument down",
        "frames_dropped_total": "frames dropped",
        "bias_last_sample_timestamp_seconds": "no bias samples",
        'up{job="insitu-daq"}': "the daemon down",
        "recording_failures_total": "a recording that failed",
        "data_disk_free_bytes": "a data disk running out of space",
        "data_dir_up": "a data folder missing or read-only",
    }
    for fragment, what in required.items():
        assert any(fragment in expr for expr in exprs.values()), f"no alert for {what}"
    no_samples = next(e for e in exprs.values() if "bias_last_sample_timestamp" in e)
    assert re.search(r">\s*10\b", no_samples), "no-bias-samples must fire after 10 s"


@pytest.mark.parametrize("rule", RULES, ids=[rule["alert"] for rule in RULES])
def test_alert_rule_uses_exported_metrics_and_labels(
    rule: dict[str, Any],
    exported: dict[str, set[str]],
    target_labels: set[str],
    scrape_job: dict[str, Any],
) -> None:
    assert rule["labels"]["severity"] in ("critical", "warning")
    assert rule["annotations"]["summary"]
    available = check_promql(rule["expr"], exported, target_labels)
    for job in re.findall(r'job="([^"]*)"', rule["expr"]):
        assert job == scrape_job["job_name"]
    texts = " ".join(rule["annotations"].values())
    for label in re.findall(r"\$labels\.([a-zA-Z_]+)", texts):
        assert label in available, f"{rule['alert']} annotation uses missing label {label}"


# ----- Grafana ---------------------------------------------------------------------------
DASHBOARD = json.loads((DEPLOY / "grafana-dashboard.json").read_text())


def dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    return [
        (panel["title"], target) for panel in DASHBOARD["panels"] for target in panel["targets"]
    ]


def test_dashboard_shows_what_the_operator_needs() -> None:
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    used = {
        name for _, target in dashboard_targets() for name in METRIC_NAME.findall(target["expr"])
    }
    required = {
        "insitu_daq_bias_voltage_volts",
        "insitu_daq_bias_setpoint_volts",
        "insitu_daq_sample_current_amperes",
        "insitu_daq_frames_received_total",
        "insitu_daq_frames_written_total",
        "insitu_daq_frames_dropped_total",
        "insitu_daq_hdf5_write_seconds_bucket",
        "insitu_daq_compliance_trips_total",
        "insitu_daq_instrument_up",
        "insitu_daq_d_spacing_meters",
        "insitu_daq_phase_fraction_ratio",
        "insitu_daq_phase_presence_ratio",
        "insitu_daq_data_disk_free_bytes",
        "insitu_daq_recording_failures_total",
    }
    assert required <= used, f"missing from the dashboard: {sorted(required - used)}"
    # Each panel says what it shows (a copied description misleads whoever hovers over it).
    descriptions = [panel["description"] for panel in DASHBOARD["panels"]]
    assert len(descriptions) == len(set(descriptions)), "panel descriptions must differ"
    assert any("histogram_quantile(0.99" in target["expr"] for _, target in dashboard_targets())
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in DASHBOARD["panels"]:  # no hard-wired data source uid from someone's Grafana
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


@pytest.mark.parametrize(
    ("title", "target"), dashboard_targets(), ids=[t for t, _ in dashboard_targets()]
)
def test_dashboard_query_uses_exported_metrics_and_labels(
    title: str, target: dict[str, Any], exported: dict[str, set[str]], target_labels: set[str]
) -> None:
    expr = target["expr"].replace("$__range", "1h")
    available = check_promql(expr, exported, target_labels)
    for label in re.findall(r"\{\{\s*([a-zA-Z_]+)\s*\}\}", target.get("legendFormat", "")):
        assert label in available, f"{title}: legend uses missing label {label}"


def test_dashboard_variables_and_annotations_use_exported_metrics(
    exported: dict[str, set[str]], target_labels: set[str]
) -> None:
    for variable in DASHBOARD["templating"]["list"]:
        if variable["type"] == "query":
            check_promql(variable["definition"], exported, target_labels)
    for annotation in DASHBOARD["annotations"]["list"]:
        check_promql(annotation["expr"], exported, target_labels)


# ----- systemd -----------------------------------------------------------------------------
def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values]}} (keys may repeat; `\\` continues lines)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


UNIT = parse_unit((DEPLOY / "insitu-daq.service").read_text())
SERVICE = UNIT["Service"]


def only(key: str) -> str:
    values = SERVICE.get(key, [])
    assert len(values) == 1, f"[Service] {key}: {values}"
    return values[0]


def seconds(value: str) -> float:
    """systemd time span ("90", "2min", "1min 30s") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hr": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def test_unit_runs_the_daemon_with_the_station_config() -> None:
    command = shlex.split(only("ExecStart"))
    assert Path(command[0]).name == "insitu-daq"
    args = build_parser().parse_args(command[1:])  # the CLI really accepts this command line
    assert args.command == "daemon"
    assert args.config == "/etc/insitu-daq/station.toml"
    assert UNIT["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_stops_gently_enough_to_ramp_the_bias_down() -> None:
    assert only("KillSignal") == "SIGTERM"
    # SIGTERM to the daemon alone: it shuts its ingest process down itself, after the run
    # file is closed; SIGKILL for everyone comes only after TimeoutStopSec.
    assert only("KillMode") == "process"  # the guardian must outlive a crashed daemon
    assert only("Restart") == "on-failure"
    limits = load_config(DEPLOY / "station.example.toml").limits
    ramp_down_s = limits.max_bias_volts / limits.max_ramp_rate_volts_per_s
    timeout = seconds(only("TimeoutStopSec"))
    assert timeout >= 30
    assert timeout >= ramp_down_s + 20  # + closing the run file and the ingest process


def test_unit_hardening_keeps_the_instruments_reachable() -> None:
    assert "dialout" in " ".join(SERVICE["SupplementaryGroups"]).split()
    assert SERVICE.get("PrivateDevices", ["no"]) == ["no"]
    assert SERVICE.get("ProtectClock", ["no"]) == ["no"]  # implies a device allow-list
    assert SERVICE.get("DevicePolicy", ["auto"]) == ["auto"]
    assert "DeviceAllow" not in SERVICE
    assert only("NoNewPrivileges") == "yes"
    assert only("ProtectSystem") == "strict"
    assert only("StateDirectory") == "insitu-daq"  # the one writable place: run files
    assert only("User") != "root"


def test_unit_shares_the_station_locks_with_a_daemon_started_by_hand() -> None:
    # ProtectSystem=strict makes /run read-only; a lock folder the service cannot write would
    # leave it blind to a second daemon (and a second daemon to it).
    writable = " ".join(SERVICE.get("ReadWritePaths", [])).split()
    assert str(SHARED_LOCK_DIR.parent) in writable
    assert load_config(DEPLOY / "station.example.toml").lock_dir is None  # the shared default


# ----- README --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["insitu-daq.service", "prometheus.yml", "alerts.yml", "grafana-dashboard.json"]
)
def test_readme_lists_the_file(name: str) -> None:
    assert f"| `{name}` |" in (DEPLOY / "README.md").read_text()
