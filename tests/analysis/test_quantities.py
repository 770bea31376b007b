"""A live-analysis quantity is declared once (analysis/quantities.py) and every user reads it:
a quantity declared at test time, with no other edit, has its log in a real run file, its line
in the report, its panel in the figure, its Prometheus gauge and its name in the `until:`
grammar."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from insitu_daq.analysis import quantities
from insitu_daq.analysis.quantities import (
    QUANTITIES,
    Metric,
    Panel,
    Quantity,
    Text,
    find,
    registered,
    value_keys,
)
from insitu_daq.analysis.reflections import DEFAULT_REFLECTIONS, PHASES
from insitu_daq.control.conditions import ConditionError, live_quantities, parse_until
from insitu_daq.report.analysis import format_analysis, read_analysis
from insitu_daq.report.figure import draw_report_figure
from insitu_daq.runfile.writer import FrameGeometry, RunMetadata, RunWriter
from insitu_daq.service.metrics import DaemonMetrics

# A throwaway quantity: the particle's aspect ratio, as a new LM measurement would add it.
ASPECT = Quantity(
    "aspect_ratio",
    "1",
    "aspect",
    description="longest over shortest projected axis of the particle",
    metric=Metric("particle_aspect_ratio", "particle aspect ratio (test only)"),
    condition=True,
    text=Text("aspect ratio"),
    panel=Panel("aspect", 5, "aspect ratio", "aspect ratio", colour="tab:olive"),
)


@pytest.fixture
def declared(monkeypatch: pytest.MonkeyPatch) -> Quantity:
    monkeypatch.setattr(quantities, "QUANTITIES", (*QUANTITIES, ASPECT))
    return ASPECT


def _write_run(path: Path, results: list[tuple[float, float | None]]) -> None:
    meta = RunMetadata(
        run_id="q1", title="a declared quantity", start_time_ns=time.time_ns(),
        reflections=DEFAULT_REFLECTIONS.names,
    )  # fmt: skip
    writer = RunWriter(path, meta, FrameGeometry(("threshold_1",), (8, 8), "<u2", None))
    for image_id, (t, aspect) in enumerate(results):
        values = {"aspect_ratio": aspect, "expansion": 0.01}
        writer.write_analysis({"time": t, "image_id": image_id, "values": values})
    writer.close(time.time_ns())


def test_a_declared_quantity_reaches_file_report_figure_metrics_and_conditions(
    declared: Quantity, tmp_path: Path
) -> None:
    path = tmp_path / "run.h5"
    _write_run(path, [(1.0, 1.2), (2.0, None), (10.0, 1.5)])
    with h5py.File(path, "r") as f:
        log = f["/entry/analysis/aspect"]
        assert log.attrs["NX_class"] == "NXlog" and log["value"].attrs["units"] == "1"
        np.testing.assert_array_equal(log["time"][:], [1.0, 2.0, 10.0])
        np.testing.assert_allclose(log["value"][:], [1.2, np.nan, 1.5])  # NaN: not measurable
        analysis = read_analysis(f["entry"])
    assert analysis.series["aspect_ratio"].last() == pytest.approx(1.5)
    assert "aspect ratio                     first 1.2, last 1.5" in format_analysis(analysis)
    drawn = draw_report_figure(path, tmp_path / "run.png")
    assert drawn.panels["aspect"] and list(drawn.panels)[-1] == "aspect"

    metrics = DaemonMetrics("127.0.0.1", 0)  # only its registry is read
    metrics.observe_analysis({"aspect_ratio": 1.3}, None)
    assert metrics.registry.get_sample_value("insitu_daq_particle_aspect_ratio") == 1.3
    metrics.observe_analysis({"aspect_ratio": None}, None)  # not measurable: NaN, not a number
    assert np.isnan(metrics.registry.get_sample_value("insitu_daq_particle_aspect_ratio"))

    assert "aspect_ratio" in live_quantities()
    until = parse_until("aspect_ratio > 1.4 and expansion > 0.2")
    assert until.quantities == {"aspect_ratio", "expansion"} and until.persistence_s == 2.0


def test_without_the_declaration_the_quantity_is_refused_and_not_written(tmp_path: Path) -> None:
    with pytest.raises(ConditionError, match="unknown quantity 'aspect_ratio'"):
        parse_until("aspect_ratio > 1.4")
    path = tmp_path / "run.h5"
    _write_run(path, [(1.0, 1.2)])
    with h5py.File(path, "r") as f:
        assert "aspect" not in f["/entry/analysis"]
        assert "aspect_ratio" not in read_analysis(f["entry"]).series


def test_every_key_belongs_to_exactly_one_declared_quantity() -> None:
    keys = value_keys(DEFAULT_REFLECTIONS)
    assert len(set(keys)) == len(keys)
    for key in keys:
        owners = [q for q in registered() if q.member_of(key) is not None]
        assert len(owners) == 1, key
    assert find("rock_salt_fraction") == (quantities.PHASE_FRACTION, "rock_salt")
    assert find("d_spacing_m.lno_003") == (quantities.D_SPACING, "lno_003")
    assert find("granite_fraction") is None  # not a phase
    assert {f"{phase}_fraction" for phase in PHASES} <= set(live_quantities())
    # Presence is not a condition quantity: one false rock-salt tile would end a hold on noise.
    assert not {f"{phase}_presence" for phase in PHASES} & set(live_quantities())
