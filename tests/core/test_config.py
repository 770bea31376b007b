"""The station config is validated before anything is touched; errors name the field."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import BaseModel

from insitu_daq.core.config import ConfigError, StationConfig, load_config, parse_config
from insitu_daq.core.instrument_models import SOURCE_METERS
from insitu_daq.core.module_command import module_command


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
        ('[source_meter]\nmodel = "keithley9999"\n', "source_meter.model"),
        ('[holder]\nmodel = "mems"\n', "holder.model"),
        ("[holder]\npoll_interval_s = 0\n", "holder.poll_interval_s"),
        ('[microscope]\nmodel = "titan"\n', "microscope.model"),
        ('[detector]\ncontrol = "epics"\n', "detector.control"),
        ('[detector]\napi_url = "127.0.0.1:8000"\n', "detector.api_url"),
        ("[detector]\ncount_time_s = 0.05\n", "detector.count_time_s"),
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


def test_an_unknown_instrument_model_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(_write(tmp_path, '[source_meter]\nmodel = "keithley9999"\n'))
    known = ", ".join(sorted(SOURCE_METERS))
    assert "keithley2400" in known
    assert str(excinfo.value) == f"source_meter.model: unknown model 'keithley9999'; known: {known}"


def test_unreadable_and_malformed_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[limits\n"))


def test_shipped_station_configs_are_valid() -> None:
    deploy = Path(__file__).resolve().parents[2] / "deploy"
    sim = load_config(deploy / "station.sim.toml")
    assert sim.source_meter.resource == "TCPIP::127.0.0.1::5025::SOCKET"
    example = load_config(deploy / "station.example.toml")
    assert example.limits.max_bias_volts == 5.0
    assert example.holder.port == "/dev/ttyUSB0"
    # The example documents every section of the config, the web view's too.
    text = (deploy / "station.example.toml").read_text()
    for section in StationConfig.model_fields:
        if isinstance(getattr(example, section), BaseModel):
            assert f"\n[{section}]" in text, section
    assert example.web.bind == "127.0.0.1" and not example.web.behind_proxy


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (  # the same key twice in a table
            "[limits]\nmax_bias_volts = 5.0\nramp_step_volts = 0.01\nmax_bias_volts = 50.0\n",
            "Cannot overwrite a value (at line 4, column 22): max_bias_volts = 50.0",
        ),
        (  # the same table twice
            "[limits]\nmax_bias_volts = 5.0\n[retry]\nattempts = 3\n[limits]\n",
            "Cannot declare ('limits',) twice (at line 5, column 8): [limits]",
        ),
    ],
)
def test_a_key_given_twice_is_refused_naming_its_line_and_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    # tomllib refuses duplicates itself; the message quotes the line so it names the key
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert str(excinfo.value) == f"{path}: not valid TOML: {expected}"


def test_the_daemon_refuses_a_config_with_a_duplicate_key_in_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "[limits]\nmax_bias_volts = 5.0\nmax_bias_volts = 50.0\n")
    result = subprocess.run(
        [*module_command("insitu_daq"), "daemon", "--config", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        f"insitu-daq: error: {path}: not valid TOML: Cannot overwrite a value"
        " (at line 3, column 22): max_bias_volts = 50.0\n"
    )
    assert not (tmp_path / "runs").exists()  # refused before anything was started
