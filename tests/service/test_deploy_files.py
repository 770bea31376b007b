"""The deploy files parse, and they name only metrics and labels the daemon really exports.

Alert rules and the dashboard are PromQL over metric names; nothing but this test stops a
renamed metric from silently blanking a panel or disarming an alert.
"""

from __future__ import annotations

import argparse
import json
import math
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


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel that shows data: rows left out, the panels of a collapsed row put in."""
    panels: list[dict[str, Any]] = []
    for panel in DASHBOARD["panels"]:
        if panel["type"] == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    return [(panel["title"], target) for panel in dashboard_panels() for target in panel["targets"]]


def test_dashboard_shows_what_the_operator_needs() -> None:
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    ids += [inner["id"] for panel in DASHBOARD["panels"] for inner in panel.get("panels", [])]
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
    descriptions = [panel["description"] for panel in dashboard_panels()]
    assert len(descriptions) == len(set(descriptions)), "panel descriptions must differ"
    assert any("histogram_quantile(0.99" in target["expr"] for _, target in dashboard_targets())
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dashboard_panels():  # no hard-wired data source uid from someone's Grafana
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_has_a_health_row_with_every_health_metric() -> None:
    """One row, at the top, says whether the station is sound: daemon scraped, its guardian,
    ingest and analysis processes, instruments, data folder, disk, losses and errors, trips."""
    first = DASHBOARD["panels"][0]
    assert first["type"] == "row" and "health" in first["title"].lower(), first["title"]
    row_end = next(
        (i for i, panel in enumerate(DASHBOARD["panels"][1:], 1) if panel["type"] == "row"),
        len(DASHBOARD["panels"]),
    )
    health = DASHBOARD["panels"][1:row_end] + first.get("panels", [])
    exprs = " ".join(target["expr"] for panel in health for target in panel["targets"])
    required = (
        'up{job="insitu-daq"',
        "insitu_daq_guardian_up",
        "insitu_daq_ingest_up",
        "insitu_daq_analysis_up",
        "insitu_daq_instrument_up",
        "insitu_daq_data_dir_up",
        "insitu_daq_records_dropped_total",
        "insitu_daq_recording_failures_total",
        "insitu_daq_frames_dropped_total",
        "insitu_daq_frames_missing_total",
        "insitu_daq_data_disk_free_bytes",
        "insitu_daq_data_disk_recording_capacity_seconds",
        "insitu_daq_compliance_trips_total",
        "insitu_daq_bias_last_sample_timestamp_seconds",
    )
    missing = [fragment for fragment in required if fragment not in exprs]
    assert not missing, f"not in the health row: {missing}"


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


# Units. A query's result is a quantity of some kind (a length, a rate ...) in the metric's base
# unit times whatever constant the query multiplies it by; the unit Grafana prints must be of
# that kind and scale. Grafana unit id -> (kind, how many of it make one base unit). Grafana has
# no Ångström or nm/s unit: a custom `suffix:` unit with the query scaled to match.
GRAFANA_UNITS: dict[str, tuple[str, float]] = {
    "lengthm": ("length", 1.0),  # SI-prefixed: 4.8e-10 shows as 480 pm
    "lengthmm": ("length", 1e3),
    "suffix:nm": ("length", 1e9),
    "suffix:Å": ("length", 1e10),
    "velocityms": ("velocity", 1.0),  # m/s, not SI-prefixed
    "suffix:nm/s": ("velocity", 1e9),
    "areaM2": ("area", 1.0),
    "s": ("time", 1.0),
    "ms": ("time", 1e3),
    "dtdurations": ("time", 1.0),
    "bytes": ("bytes", 1.0),
    "decbytes": ("bytes", 1.0),
    "volt": ("voltage", 1.0),
    "mvolt": ("voltage", 1e3),
    "amp": ("current", 1.0),
    "mamp": ("current", 1e3),
    "hertz": ("rate", 1.0),
    "cps": ("rate", 1.0),
    "suffix:/s": ("rate", 1.0),
    "suffix:frames/s": ("rate", 1.0),
    "percentunit": ("ratio", 1.0),
    "percent": ("ratio", 100.0),
    "none": ("number", 1.0),
    "short": ("number", 1.0),
}
# Plain numbers suit counts, states (0/1, mapped to words) and dimensionless ratios.
PLAIN_NUMBER_KINDS = {"count", "state", "ratio"}
# A gauge's kind from its name's unit suffix (DESIGN.md: base units in the name); the longest
# suffix that matches wins (`_meters_per_second` before `_meters`).
NAME_SUFFIX_KINDS = {
    "_meters_per_second": "velocity",
    "_square_meters": "area",
    "_meters": "length",
    "_timestamp_seconds": "timestamp",
    "_seconds": "time",
    "_bytes": "bytes",
    "_volts": "voltage",
    "_amperes": "current",
    "_ratio": "ratio",
    "_total": "count",
    "_up": "state",
    "_state": "state",
}
NUMBER = r"(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)"


def grafana_unit(unit: str) -> str:
    """A unit id as the table above spells it (`suffix: Å` and `suffix:Å` are one unit)."""
    return re.sub(r"^suffix:\s*", "suffix:", unit)


def gauge_kind(name: str) -> str:
    for suffix in sorted(NAME_SUFFIX_KINDS, key=len, reverse=True):
        if name.endswith(suffix):
            return NAME_SUFFIX_KINDS[suffix]
    raise AssertionError(f"{name}: no unit suffix this test knows (add it to NAME_SUFFIX_KINDS)")


def query_quantity(expr: str) -> tuple[str, float]:
    """(kind, scale) of what a PromQL query returns: its kind from the functions and metric
    names it uses, its scale the constants it multiplies (or divides) by."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # selectors and range windows
    bare = " ".join(bare.split())
    scale = 1.0
    for number in re.findall(rf"\*\s*{NUMBER}", bare) + re.findall(rf"{NUMBER}\s*\*", bare):
        scale *= float(number)
    for number in re.findall(rf"/\s*{NUMBER}", bare):
        scale /= float(number)
    names = set(METRIC_NAME.findall(bare))
    if "histogram_quantile(" in bare:
        (bucket,) = names
        return gauge_kind(bucket.removesuffix("_bucket")), scale
    if re.search(r"\b(?:rate|irate)\(", bare):
        return "rate", scale
    if re.search(r"\b(?:increase|changes|resets)\(", bare):
        return "count", scale
    if re.fullmatch(r"up(?:\s*==\s*\d)?", bare):
        return "state", scale
    kinds = {gauge_kind(name) for name in names}
    if kinds == {"timestamp"} and re.search(r"\btime\(\)\s*-", bare):
        return "time", scale  # an age: now minus a timestamp
    assert len(kinds) == 1, f"cannot tell what {expr!r} measures ({kinds})"
    return kinds.pop(), scale


def target_matches(matcher: dict[str, Any], target: dict[str, Any]) -> bool:
    """Whether a field override's matcher selects the fields of `target`."""
    legend = target.get("legendFormat", "")
    if matcher["id"] == "byFrameRefID":
        return bool(matcher["options"] == target["refId"])
    if matcher["id"] == "byName":  # the display name: a legend without {{label}} parts
        return "{{" not in legend and matcher["options"] == legend
    if matcher["id"] == "byRegexp":
        return re.fullmatch(matcher["options"], legend) is not None
    raise AssertionError(f"override matcher {matcher['id']} unknown to this test")


def field_config(panel: dict[str, Any], target: dict[str, Any], key: str) -> Any:
    """The value of field config `key` ("unit", "custom.thresholdsStyle") for the fields of
    one target: the panel's default, then each override that selects it, in order."""
    value: Any = panel["fieldConfig"]["defaults"]
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    for override in panel["fieldConfig"].get("overrides", []):
        if target_matches(override["matcher"], target):
            for prop in override["properties"]:
                if prop["id"] == key:
                    value = prop["value"]
    return value


def panel_fields() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(p["title"], p, t) for p in dashboard_panels() for t in p["targets"]]


@pytest.mark.parametrize(
    ("title", "panel", "target"),
    panel_fields(),
    ids=[f"{title}/{t['refId']}" for title, _, t in panel_fields()],
)
def test_dashboard_unit_fits_what_the_query_measures(
    title: str, panel: dict[str, Any], target: dict[str, Any]
) -> None:
    """`_meters` in a length unit, `_meters_per_second` in a velocity unit, rates in a
    per-second unit, `_seconds` in a time unit, `_bytes` in a bytes unit; scaled queries in
    the unit of their scale (d-spacings `* 1e10` in Å)."""
    kind, scale = query_quantity(target["expr"])
    unit = field_config(panel, target, "unit")
    assert unit, f"{title}/{target['refId']}: no unit"
    known = GRAFANA_UNITS.get(grafana_unit(unit))
    assert known is not None, f"{title}: unit {unit!r} unknown to this test (GRAFANA_UNITS)"
    unit_kind, per_base_unit = known
    fits = unit_kind == kind or (unit_kind == "number" and kind in PLAIN_NUMBER_KINDS)
    assert fits, f"{title}/{target['refId']}: {target['expr']!r} is a {kind}, shown as {unit}"
    assert math.isclose(scale, per_base_unit), (
        f"{title}/{target['refId']}: the query scales by {scale:g}, unit {unit} wants "
        f"{per_base_unit:g}"
    )


def test_dashboard_shows_d_spacings_in_angstrom() -> None:
    fields = [
        (panel, target)
        for _, panel, target in panel_fields()
        if "insitu_daq_d_spacing_meters" in target["expr"]
    ]
    assert fields, "no d-spacing panel"
    for panel, target in fields:
        assert grafana_unit(field_config(panel, target, "unit")) == "suffix:Å", panel["title"]
        assert query_quantity(target["expr"]) == ("length", 1e10), target["expr"]
        assert field_config(panel, target, "decimals") == 2, panel["title"]


def test_dashboard_front_position_and_speed_have_their_own_units() -> None:
    units = {
        METRIC_NAME.findall(target["expr"])[0]: grafana_unit(field_config(panel, target, "unit"))
        for _, panel, target in panel_fields()
        if "insitu_daq_front_" in target["expr"]
    }
    assert GRAFANA_UNITS[units["insitu_daq_front_position_meters"]][0] == "length"
    assert GRAFANA_UNITS[units["insitu_daq_front_velocity_meters_per_second"]][0] == "velocity"


def alert_thresholds() -> list[tuple[str, str, float]]:
    """(alert, metric, value) for each comparison with a number other than 0 in alerts.yml
    (`> 0` and `== 0` say "any" or "down": the panels show those by colour, not by a line)."""
    found = []
    for rule in RULES:
        for part in re.split(r"\b(?:or|and|unless)\b", rule["expr"]):
            compared = re.search(rf"(?:[<>]=?|[=!]=)\s*{NUMBER}\s*$", part.strip())
            if compared and float(compared.group(1)) != 0:
                found += [
                    (rule["alert"], m, float(compared.group(1))) for m in METRIC_NAME.findall(part)
                ]
    return found


@pytest.mark.parametrize(
    ("alert", "metric", "value"), alert_thresholds(), ids=[a for a, _, _ in alert_thresholds()]
)
def test_dashboard_shows_each_alerts_threshold(alert: str, metric: str, value: float) -> None:
    """An alert's limit is drawn on a panel of its metric (a line on a graph, a colour change
    on a stat), so whoever looks at the panel sees how near the alert is."""
    shown = []
    for title, panel, target in panel_fields():
        if metric not in target["expr"]:
            continue
        steps = (field_config(panel, target, "thresholds") or {}).get("steps", [])
        scale = query_quantity(target["expr"])[1]
        at_limit = [s for s in steps if s["value"] is not None]
        if any(math.isclose(s["value"], value * scale) for s in at_limit):
            style = field_config(panel, target, "custom.thresholdsStyle") or {}
            visible = panel["type"] != "timeseries" or style.get("mode", "off") != "off"
            assert visible, f"{title}: the threshold of {alert} is not drawn"
            shown.append(title)
    assert shown, f"no panel of {metric} has {alert}'s threshold {value:g}"


# Grafana-managed alert rules: the same rules as alerts.yml, for sites whose alerts go out
# through Grafana rather than Alertmanager. Each has the Prometheus rule's expression as its
# query, and fires as Prometheus does: for every series the query returns.
GRAFANA_DATASOURCE_UID = "${INSITU_DAQ_PROMETHEUS_UID}"


@pytest.fixture(scope="module")
def grafana_rules() -> dict[str, dict[str, Any]]:
    provisioning = yaml.safe_load((DEPLOY / "grafana-alerts.yml").read_text())
    assert provisioning["apiVersion"] == 1
    rules: dict[str, dict[str, Any]] = {}
    uids = set()
    for group in provisioning["groups"]:
        assert group["name"] and group["folder"] and group["interval"], group
        for rule in group["rules"]:
            assert rule["title"] not in rules, f"two Grafana rules {rule['title']}"
            assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", rule["uid"]), rule["uid"]
            assert rule["uid"] not in uids, f"two Grafana rules with uid {rule['uid']}"
            uids.add(rule["uid"])
            rules[rule["title"]] = rule
    return rules


def promql(expr: str) -> str:
    return " ".join(expr.split()).replace("( ", "(").replace(" )", ")")


def test_grafana_alert_rules_are_the_prometheus_rules(
    grafana_rules: dict[str, dict[str, Any]],
) -> None:
    assert set(grafana_rules) == {rule["alert"] for rule in RULES}


@pytest.mark.parametrize("rule", RULES, ids=[rule["alert"] for rule in RULES])
def test_grafana_alert_rule_matches_its_prometheus_rule(
    rule: dict[str, Any],
    grafana_rules: dict[str, dict[str, Any]],
    exported: dict[str, set[str]],
    target_labels: set[str],
) -> None:
    grafana = grafana_rules.get(rule["alert"])
    assert grafana is not None, f"no Grafana rule for {rule['alert']}"
    nodes = {node["refId"]: node for node in grafana["data"]}
    queries = [node for node in grafana["data"] if node["datasourceUid"] != "__expr__"]
    assert len(queries) == 1, "one Prometheus query per rule"
    (query,) = queries
    assert query["datasourceUid"] == GRAFANA_DATASOURCE_UID
    assert query["model"]["refId"] == query["refId"]
    assert query["model"].get("instant") is True
    assert promql(query["model"]["expr"]) == promql(rule["expr"]), "not the same expression"
    available = check_promql(query["model"]["expr"], exported, target_labels)
    # Prometheus fires for every series the expression returns and is quiet when it returns
    # none: the condition is "the query returned a number" and no data is OK.
    condition = nodes[grafana["condition"]]["model"]
    assert condition["type"] == "threshold"
    assert condition["conditions"][0]["evaluator"] == {"type": "gt", "params": [0]}
    math_node = nodes[condition["expression"]]["model"]
    assert math_node["type"] == "math"
    ref = query["refId"]
    assert (
        promql(math_node["expression"]) == f"is_number(${ref}) || is_nan(${ref}) || is_inf(${ref})"
    )
    assert grafana["noDataState"] == "OK"
    assert seconds(grafana.get("for", "0s")) == seconds(rule.get("for", "0s"))
    assert grafana["labels"] == rule["labels"]
    assert grafana["annotations"]["summary"]
    texts = " ".join(grafana["annotations"].values())
    # In Grafana $value is every node's value as text; a number is $values.<refId>.Value.
    assert not re.search(r"\$value\b", texts), "use $values.query.Value, not $value"
    for label in re.findall(r"\$labels\.([a-zA-Z_]+)", texts):
        assert label in available, f"{rule['alert']} annotation uses missing label {label}"
    for name in re.findall(r"\$values\.([A-Za-z0-9_]+)", texts):
        assert name in nodes, f"{rule['alert']} annotation uses missing node {name}"


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


# ----- the web view: its systemd unit and nginx ---------------------------------------------
WEB_UNIT = parse_unit((DEPLOY / "insitu-daq-web.service").read_text())
WEB_SERVICE = WEB_UNIT["Service"]
WEB_ADDRESS = "127.0.0.1:8080"  # docs/WEB.md: [web] bind and port as the proxy expects them


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def cli_commands() -> set[str]:
    parser = build_parser()
    return {
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }


def test_web_unit_runs_the_web_view_with_the_station_config() -> None:
    command = shlex.split(one(WEB_SERVICE, "ExecStart"))
    assert Path(command[0]).name == "insitu-daq"
    assert command[0] == shlex.split(only("ExecStart"))[0], "the daemon's installation"
    assert command[1:] == ["web", "--config", "/etc/insitu-daq/station.toml"]
    if "web" in cli_commands():  # the CLI really accepts this command line
        args = build_parser().parse_args(command[1:])
        assert args.command == "web"
        assert args.config == "/etc/insitu-daq/station.toml"
    assert WEB_UNIT["Install"]["WantedBy"] == ["multi-user.target"]


def test_web_unit_starts_after_the_daemon_and_never_stops_it() -> None:
    unit = WEB_UNIT["Unit"]
    assert "insitu-daq.service" in " ".join(unit.get("After", [])).split()
    # docs/WEB.md: the web view can fail or be restarted during a run without touching it.
    for key in ("Requires", "Requisite", "BindsTo", "PartOf"):
        assert "insitu-daq.service" not in " ".join(unit.get(key, [])), key
    assert one(WEB_SERVICE, "Restart") == "on-failure"


def test_web_unit_has_network_and_read_access_only() -> None:
    user = one(WEB_SERVICE, "User")
    assert user not in ("root", only("User")), "its own user, not the daemon's"
    groups = " ".join(WEB_SERVICE.get("SupplementaryGroups", [])).split()
    assert "dialout" not in groups, "no instruments"
    assert only("Group") in groups, "reads the run files and station config (group-readable)"
    assert one(WEB_SERVICE, "NoNewPrivileges") == "yes"
    assert one(WEB_SERVICE, "ProtectSystem") == "strict"  # the data folder read-only with it
    assert one(WEB_SERVICE, "ProtectHome") == "yes"
    assert one(WEB_SERVICE, "PrivateDevices") == "yes"
    assert one(WEB_SERVICE, "CapabilityBoundingSet") == ""
    assert "ReadWritePaths" not in WEB_SERVICE
    assert "StateDirectory" not in WEB_SERVICE, "/var/lib/insitu-daq is the daemon's"
    families = set(one(WEB_SERVICE, "RestrictAddressFamilies").split())
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} >= families >= {"AF_INET"}


def parse_nginx(text: str) -> list[tuple[str, list[str], list[Any] | None]]:
    """An nginx config as a tree of (directive, arguments, block or None); comments dropped,
    quotes removed."""
    token = re.compile(
        r"""(#[^\n]*)|("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|([{};])|([^\s{};"'#]+)"""
    )
    stack: list[list[Any]] = [[]]
    words: list[str] = []
    for comment, quoted, punctuation, word in token.findall(text):
        if comment:
            continue
        if quoted or word:
            words.append(quoted[1:-1] if quoted else word)
        elif punctuation == ";":
            stack[-1].append((words[0], words[1:], None))
            words = []
        elif punctuation == "{":
            block: list[Any] = []
            stack[-1].append((words[0], words[1:], block))
            stack.append(block)
            words = []
        else:
            assert not words, f"directive without ';': {words}"
            stack.pop()
    assert len(stack) == 1 and not words, "unbalanced braces"
    return stack[0]


def directives(block: list[Any], name: str) -> list[list[str]]:
    return [args for directive, args, _ in block if directive == name]


def blocks(block: list[Any], name: str) -> list[tuple[list[str], list[Any]]]:
    return [(args, inner) for directive, args, inner in block if directive == name and inner]


def nginx_seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 1e-3, None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def nginx_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * 1024 ** " kmg".index(unit.lower() or " ")


NGINX = parse_nginx((DEPLOY / "nginx-insitu-daq-web.conf").read_text())
NGINX_SERVERS = [inner for _, inner in blocks(NGINX, "server")]
HTTPS_SERVERS = [s for s in NGINX_SERVERS if any("ssl" in a for a in directives(s, "listen"))]


def location(server: list[Any], path: str) -> list[Any]:
    found = [inner for args, inner in blocks(server, "location") if args[-1] == path]
    assert len(found) == 1, f"location {path}: {len(found)} found"
    return found[0]


def test_nginx_serves_https_and_redirects_http_to_it() -> None:
    assert len(HTTPS_SERVERS) == 1
    (https,) = HTTPS_SERVERS
    assert any(args[0].endswith("443") for args in directives(https, "listen"))
    assert directives(https, "ssl_certificate") and directives(https, "ssl_certificate_key")
    (protocols,) = directives(https, "ssl_protocols")
    assert set(protocols) <= {"TLSv1.2", "TLSv1.3"}
    plain = [s for s in NGINX_SERVERS if s not in HTTPS_SERVERS]
    assert plain, "no HTTP server redirecting to HTTPS"
    for server in plain:
        assert any(args[0].endswith("80") for args in directives(server, "listen"))
        assert [args[:1] for args in directives(server, "return")] in ([["301"]], [["308"]])
        assert directives(server, "return")[0][1].startswith("https://")
        assert not blocks(server, "location"), "plain HTTP serves nothing"


def upstream_addresses(proxy_pass: str) -> list[str]:
    name = re.fullmatch(r"http://([^/]+)/?", proxy_pass).group(1)  # type: ignore[union-attr]
    upstreams = {args[0]: inner for args, inner in blocks(NGINX, "upstream")}
    if name not in upstreams:
        return [name]
    return [args[0] for args in directives(upstreams[name], "server")]


def test_nginx_proxies_the_page_and_the_websocket_to_the_web_view() -> None:
    (https,) = HTTPS_SERVERS
    proxied = [inner for _, inner in blocks(https, "location") if directives(inner, "proxy_pass")]
    assert location(https, "/") in proxied and location(https, "/ws") in proxied
    for loc in proxied:
        (proxy_pass,) = directives(loc, "proxy_pass")
        assert upstream_addresses(proxy_pass[0]) == [WEB_ADDRESS]
        assert directives(loc, "proxy_http_version") == [["1.1"]]
        # proxy_set_header is not inherited into a location that sets any: each sets all.
        headers = {args[0].lower(): args[1] for args in directives(loc, "proxy_set_header")}
        assert headers.get("x-forwarded-for") in ("$remote_addr", "$proxy_add_x_forwarded_for")
        assert headers.get("x-forwarded-proto") == "$scheme"
        assert headers.get("host") == "$host"


def test_nginx_proxies_the_websocket_with_its_upgrade_unbuffered() -> None:
    (https,) = HTTPS_SERVERS
    ws = location(https, "/ws")
    headers = {args[0].lower(): args[1] for args in directives(ws, "proxy_set_header")}
    assert headers["upgrade"] == "$http_upgrade"
    connection = headers["connection"]
    if connection.startswith("$"):  # a map: "upgrade" when the client asked for an upgrade
        maps = {args[1]: inner for args, inner in blocks(NGINX, "map")}
        assert blocks(NGINX, "map") and connection in maps, f"{connection} is not a map"
        assert [args for key, args, _ in maps[connection] if key == "default"] == [["upgrade"]]
    else:
        assert connection.lower() == "upgrade"
    assert directives(ws, "proxy_buffering") == [["off"]]
    (timeout,) = directives(ws, "proxy_read_timeout")
    assert nginx_seconds(timeout[0]) >= 600, "a live view stays open for a long time"


def test_nginx_limits_bodies_and_sends_security_headers() -> None:
    (https,) = HTTPS_SERVERS
    (size,) = directives(https, "client_max_body_size")
    assert 0 < nginx_bytes(size[0]) <= 1024**2, "the page posts only small JSON"
    headers = {args[0].lower(): args[1:] for args in directives(https, "add_header")}
    for name in ("strict-transport-security", "x-content-type-options", "x-frame-options"):
        assert name in headers, name
        assert headers[name][-1] == "always", f"{name} on error answers too"
    assert "frame-ancestors 'none'" in headers["content-security-policy"][0]
    for _, inner in blocks(https, "location"):  # add_header there would drop the server's
        assert not directives(inner, "add_header")


# ----- README --------------------------------------------------------------------------------
def deploy_files() -> list[str]:
    return sorted(
        str(path.relative_to(DEPLOY))
        for path in DEPLOY.rglob("*")
        if path.is_file() and path.name != "README.md" and "__pycache__" not in path.parts
    )


@pytest.mark.parametrize("name", deploy_files())
def test_readme_lists_the_file(name: str) -> None:
    assert f"| `{name}` |" in (DEPLOY / "README.md").read_text()
