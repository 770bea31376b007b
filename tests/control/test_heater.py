"""The heater's safe state without a daemon (control/heater.py): what the guardian and
`insitu-daq safe` run, against the simulated heating holder over TCP.
"""

from __future__ import annotations

import time

from insitu_daq.control.heater import make_holder_safe, model_heats, start_ramp
from insitu_daq.core.config import StationConfig, parse_config
from insitu_daq.drivers.heating_holder import MemsHeatingHolder
from insitu_daq.sim.heating_holder import SimulatedHeatingHolder
from insitu_daq.sim.station import SimStation


def _config(port: str, model: str = "mems_heating") -> StationConfig:
    return parse_config(
        {
            "holder": {"model": model, "port": port, "timeout_s": 0.5},
            "retry": {"attempts": 2, "first_delay_s": 0.01, "max_delay_s": 0.01},
        }
    )


def test_make_holder_safe_switches_a_hot_heater_off_and_says_when_it_cannot() -> None:
    station = SimStation(time_scale=100.0)
    with SimulatedHeatingHolder(station, port=0, pty=False) as sim:
        url = sim.endpoints["url"]
        with MemsHeatingHolder(url) as holder:
            start_ramp(holder, 300.0, 100.0)
            time.sleep(0.05)  # 5 model s: 300 C... on its way
            assert holder.status().heater_on and holder.temperature_c() > 200.0
        config = _config(url)
        assert model_heats(config) and not model_heats(_config(url, "open_cell"))
        assert make_holder_safe(config, persist_s=0.0)
        with station.model():
            assert not station.chip.heater_on
        assert make_holder_safe(config, persist_s=0.0)  # already off: nothing to do, True
    # Nobody answers: False (the caller says the heater may still be on), after the retries.
    began = time.monotonic()
    assert not make_holder_safe(config, persist_s=0.0)
    assert time.monotonic() - began < 5.0
    assert make_holder_safe(_config(url, "open_cell"), persist_s=0.0)  # no heater: nothing
