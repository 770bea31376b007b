"""A live-analysis quantity is declared once (analysis/quantities.py) and every user reads it:
a quantity declared at test time, with no other edit, has its log in a real run file, its line
in the report, its panel in the figure, its Prometheus gauge and its name in the `until:`
grammar; with a measurement registered for it (analysis/measurement.py), FrameAnalyzer's
results carry it."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from sim_frames import cell

from insitu_daq.analysis import quantities
from insitu_daq.analysis.measurement import LmSum, Measured, measures, unregister
from insitu_daq.analysis.pipeline import FrameAnalyzer
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
from insitu_daq.sim.optics import Optics
from insitu_daq.sim.render import FrameRenderer, Scene

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
    _write_values(path, [(t, {"aspect_ratio": aspect, "expansion": 0.01}) for t, aspect in results])


def _write_values(path: Path, results: list[tuple[float, dict[str, float | None]]]) -> None:
    meta = RunMetadata(
        run_id="q1", title="a declared quantity", start_time_ns=time.time_ns(),
        reflections=DEFAULT_REFLECTIONS.names,
    )  # fmt: skip
    writer = RunWriter(path, meta, FrameGeometry(("threshold_1",), (8, 8), "<u2", None))
    for image_id, (t, values) in enumerate(results):
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


def _aspect_ratio(sum_: LmSum) -> Measured:
    """Longest over shortest principal axis of the segmented particle (a new LM quantity)."""
    mask = sum_.segmentation.particle
    if mask is None:
        return Measured({"aspect_ratio": None}, {"aspect": "no particle"})
    rows, cols = np.nonzero(mask)
    axes = np.linalg.eigvalsh(np.cov(np.stack([rows, cols]).astype(float)))
    return Measured({"aspect_ratio": float(np.sqrt(axes[-1] / axes[0]))})


def test_a_registered_measurement_fills_its_quantity_in_every_result(
    declared: Quantity, tmp_path: Path
) -> None:
    """Declaration + one registered function, no pipeline edit: the value is in each LM
    result after the built-in keys, and in the run file; unregistered, it is gone."""
    optics = Optics()
    optics.set_mode("lm")
    frame, _ = FrameRenderer((1024, 1024), seed=2).render(
        Scene.capture(cell(x=0.0), optics), 0.025, 0
    )
    measures("lm", declared)(_aspect_ratio)
    try:
        analyzer = FrameAnalyzer()
        results = [analyzer.analyze(frame, t, "lm", 1.0) for t in (0.0, 1.0)]
        hrtem = analyzer.analyze(frame, 2.0, "hrtem", 0.06)
    finally:
        unregister(_aspect_ratio)
    for values in results:
        assert list(values)[-1] == "aspect_ratio"
        assert values["aspect_ratio"] == pytest.approx(1.0, abs=0.05)  # the sim's round particle
        assert values["projected_area_m2"] is not None  # the built-in measurements still run
    assert "aspect_ratio" not in hrtem  # registered for LM sums only
    path = tmp_path / "run.h5"
    _write_values(path, [(1.0, results[0]), (2.0, results[1])])
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["/entry/analysis/aspect/value"][:], [
            results[0]["aspect_ratio"], results[1]["aspect_ratio"]])  # fmt: skip
    assert "aspect_ratio" not in FrameAnalyzer().analyze(frame, 0.0, "lm", 1.0)
