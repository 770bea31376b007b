"""The daemon's dose accounting (service/dose.py) on the record bus and the imaging timeline it
shares with the ingest: exposure rows for the run file, the budget reached once, and the
temperature rule fed through the holder's `temperature` series, the path a heating holder's
readings take (control/instruments/monitor.py publishes them on the bus)."""

from __future__ import annotations

import math
import threading

import pytest

from insitu_daq.core.config import DoseConfig
from insitu_daq.core.imaging import ImagingState
from insitu_daq.service.bus import RecordBus
from insitu_daq.service.dose import BudgetReached, DoseAccountant


class _Run:
    """What the daemon wires to the accountant: the run file's rows, the budget callback."""

    def __init__(self, budget: float = 5000.0) -> None:
        self.rows: list[tuple[float, ...]] = []
        self.reached: list[BudgetReached] = []
        self.called = threading.Event()
        self.bus = RecordBus()
        self.dose = DoseAccountant(
            DoseConfig(budget_e_per_a2=budget),
            lambda: (1024, 1024),
            self.rows.extend,
            self._reached,
        )
        self.bus.attach(self.dose)

    def _reached(self, reached: BudgetReached) -> None:
        self.reached.append(reached)
        self.called.set()

    def temperature(self, celsius: float) -> None:
        # A holder series row: (time, half-width, value) on the run clock.
        self.bus.publish("series", ("temperature", [(1.0, 0.001, celsius)]))


def _hrtem(start: float, rate: float) -> ImagingState:
    return ImagingState(start, start, "hrtem", 0.06e-9, rate, 440.0, 0.0)


def test_the_budget_is_halved_above_275_c_read_from_the_holder_s_temperature() -> None:
    run = _Run()
    assert run.dose.budget() == (5000.0, "dose.budget_e_per_a2")  # none known: room temp
    run.temperature(250.0)
    assert run.dose.budget()[0] == 5000.0
    run.temperature(300.0)
    assert run.dose.budget() == (2500.0, "dose.hot_budget_e_per_a2")
    run.bus.publish("series", ("holder_position", [(1.0, 0.001, 300.0)]))  # not a temperature
    assert run.dose.budget()[0] == 2500.0


def test_dose_goes_to_the_field_and_the_budget_is_reached_once_per_lighting() -> None:
    run = _Run(budget=90.0)
    run.dose.open_run()
    run.dose.set_imaging(_hrtem(-math.inf, 0.0), 1)  # blanked at run start
    run.dose.imaging_watermark(0.0, 1)
    run.dose.set_imaging(_hrtem(1.0, 50.0), 2)  # unblanked at 1 s, 50 e/A^2/s
    for tick in range(1, 31):
        run.dose.imaging_watermark(tick * 0.1, 2)
    assert run.dose.status()["field_e_per_a2"] == pytest.approx(100.0)
    assert run.called.wait(5.0)  # on a thread of its own (it blanks the beam)
    assert len(run.reached) == 1
    reached = run.reached[0]
    assert 90.0 <= reached.dose_e_per_a2 <= 95.0 and reached.budget_e_per_a2 == 90.0
    assert "61.4 x 61.4 nm field at (440, 0) nm" in reached.message()
    for tick in range(31, 40):  # still lit (the blank not yet announced): no second call
        run.dose.imaging_watermark(tick * 0.1, 2)
    assert len(run.reached) == 1
    run.dose.set_imaging(_hrtem(4.0, 0.0), 3)  # blanked
    run.dose.imaging_watermark(5.0, 3)
    run.dose.close_run()
    # The exposure rows: (time, 0, duration, dose, x_min, x_max, y_min, y_max, budget);
    # together the 3 s lit at 50 e/A^2/s, all on the HRTEM field.
    assert sum(row[3] for row in run.rows) == pytest.approx(150.0)
    assert sum(row[2] for row in run.rows) == pytest.approx(3.0)
    for row in run.rows:
        assert row[4:8] == pytest.approx((409.28, 470.72, -30.72, 30.72))
