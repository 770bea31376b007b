"""`insitu-daq demo --protocol ncm_heating_short.yaml`: the demo's heating station, without
running it (the demo itself was run by hand; its figures are in the README). A protocol that
heats gets the heating holder and limits that let it run; the others keep today's station."""

from __future__ import annotations

from pathlib import Path

from insitu_daq.app.demo import (
    HEATING_HOLDER,
    protocol_heats,
    reference_protocol,
    station_toml,
)
from insitu_daq.control.protocol import Protocol
from insitu_daq.core.config import load_config
from insitu_daq.service.recording_plan import protocol_seconds

PORTS = dict.fromkeys(("source_meter", "holder", "microscope", "camera", "control"), 1)


def test_the_short_heating_protocol_runs_on_the_demos_heating_station_in_minutes(
    tmp_path: Path,
) -> None:
    text = reference_protocol("ncm_heating_short.yaml")
    assert protocol_heats(text, "ncm_heating_short")
    assert protocol_heats(reference_protocol("ncm_heating_staircase.yaml"), "staircase")
    assert not protocol_heats(reference_protocol(), "lno_4v3")
    heat_then_wait = "steps:\n  - hold: {duration_s: 60, until: temperature_celsius >= 40}\n"
    assert protocol_heats(heat_then_wait, "until_warm")

    config = tmp_path / "station.toml"
    ports = {**PORTS, "events": 2, "metrics": 3}
    config.write_text(station_toml(ports, tmp_path, 10.0, holder_model=HEATING_HOLDER))
    station = load_config(config)
    assert station.holder.model == HEATING_HOLDER
    protocol = Protocol.parse(text, "yaml", name="ncm_heating_short")
    protocol.validate_against(station.limits)  # LimitError, naming the step, if not
    run_s, recorded_s = protocol_seconds(protocol, station.limits)
    assert run_s < 10 * 60  # station seconds: about a minute of wall time at time scale 10
    assert recorded_s == 4 * 5.0  # 4 levels, 5 s of frames at each

    plain = tmp_path / "plain.toml"
    plain.write_text(station_toml(ports, tmp_path, 10.0))
    assert load_config(plain).holder.model == "open_cell"
