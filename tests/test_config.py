"""The station config is validated before anything is touched; errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from insitu_daq.config import ConfigError, load_config, parse_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "station.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_documented_safety_limits() -> None:
    config = parse_config({})
    assert config.limits.max_bias_volts == 5.0
    assert config.limits.compliance_amperes == 100e-9
    assert config.limits.max_ramp_rate_volts_per_s == 1.0
    assert config.sampling.bias_rate_hz == 50.0


def test_relative_data_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'data_dir = "runs"\n[limits]\nmax_bias_volts = 4.5\n')
    config = load_config(path)
    assert config.data_dir == tmp_path / "runs"
    assert config.limits.max_bias_volts == 4.5


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[limits]\nmax_bias_volts = -1\n", "limits.max_bias_volts"),
        ("[limits]\ncompliance_amperes = 2.0\n", "limits.compliance_amperes"),
        ("[limits]\nmax_ramp_rate = 1.0\n", "limits.max_ramp_rate"),
        ('[sampling]\nbias_rate_hz = "fast"\n', "sampling.bias_rate_hz"),
        ("[microscope]\nport = 70000\n", "microscope.port"),
        ('[api]\ncontrol = "tcp://0.0.0.0:5555"\n', "api"),
        ("[detektor]\nendpoint = 'tcp://x:1'\n", "detektor"),
        ("[analysis]\nmin_rate_hz = 0\n", "analysis.min_rate_hz"),
        ('[analysis]\nmin_rate_hz = "often"\n', "analysis.min_rate_hz"),
        # a floor above the cap: the analysis would drop most of what the ingest sends it
        ("[analysis]\nmax_rate_hz = 10\nmin_rate_hz = 20\n", "analysis.min_rate_hz"),
    ],
)
def test_wrong_value_is_refused_with_one_line_naming_the_field(
    tmp_path: Path, text: str, field: str
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(_write(tmp_path, text))
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(field)


def test_unreadable_and_malformed_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[limits\n"))


def test_shipped_station_configs_are_valid() -> None:
    deploy = Path(__file__).resolve().parents[1] / "deploy"
    sim = load_config(deploy / "station.sim.toml")
    assert sim.source_meter.resource == "TCPIP::127.0.0.1::5025::SOCKET"
    example = load_config(deploy / "station.example.toml")
    assert example.limits.max_bias_volts == 5.0
    assert example.holder.port == "/dev/ttyUSB0"
