"""Protocols are validated before anything moves, and every error names the step and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from insitu_daq.control.protocol import (
    Acquire,
    Approach,
    Bias,
    Hold,
    Mark,
    Microscope,
    Protocol,
    ProtocolError,
    Retract,
    Wait,
)
from insitu_daq.core.config import ConfigError, SafetyLimits

PROTOCOLS = Path(__file__).resolve().parents[2] / "deploy" / "protocols"

SMALL_YAML = """\
# comments are kept in the text written into the run file
name: small
description: a short run
steps:
  - approach: {speed_nm_s: 200, max_travel_nm: 5000}
  - microscope: {mode: hrtem, beam: on, dose_rate_e_per_a2_s: 35}
  - acquire: start
  - bias: {volts: 4.3, rate_volts_per_s: 0.5}
  - hold: {duration_s: 120, until: "rock_salt_fraction >= 0.9"}
  - bias: 0
  - wait: 2
  - mark: done
  - acquire: stop
  - retract: {distance_nm: 1000}
"""

SMALL_TOML = """\
name = "small"
description = "a short run"

[[steps]]
approach = { speed_nm_s = 200, max_travel_nm = 5000 }
[[steps]]
microscope = { mode = "hrtem", beam = true, dose_rate_e_per_a2_s = 35 }
[[steps]]
acquire = "start"
[[steps]]
bias = { volts = 4.3, rate_volts_per_s = 0.5 }
[[steps]]
hold = { duration_s = 120, until = "rock_salt_fraction >= 0.9" }
[[steps]]
bias = 0
[[steps]]
wait = 2
[[steps]]
mark = "done"
[[steps]]
acquire = "stop"
[[steps]]
retract = { distance_nm = 1000 }
"""

SMALL_PYTHON = Protocol(
    name="small",
    description="a short run",
    steps=[
        Approach(speed_nm_s=200, max_travel_nm=5000),
        Microscope(mode="hrtem", beam=True, dose_rate_e_per_a2_s=35),
        Acquire(action="start"),
        Bias(volts=4.3, rate_volts_per_s=0.5),
        Hold(duration_s=120, until="rock_salt_fraction >= 0.9"),
        Bias(volts=0),
        Wait(duration_s=2),
        Mark(text="done"),
        Acquire(action="stop"),
        Retract(distance_nm=1000),
    ],
)


def test_shipped_reference_protocol_is_the_science_md_experiment() -> None:
    protocol = Protocol.load(PROTOCOLS / "lno_4v3.yaml").validate_against(SafetyLimits())
    assert protocol.name == "lno_4v3"
    kinds = [step.kind for step in protocol.steps]
    # approach -> contact -> record -> ramp to +4.3 V -> hold 120 s -> ramp down -> stop -> retract
    order = ["approach", "acquire", "bias", "hold", "bias", "acquire", "retract"]
    positions = [kinds.index("approach")]
    for kind in order[1:]:
        positions.append(kinds.index(kind, positions[-1] + 1))
    assert positions == sorted(positions)
    biases = [step for step in protocol.steps if isinstance(step, Bias)]
    assert [b.volts for b in biases] == [4.3, 0.0]
    (hold,) = [step for step in protocol.steps if isinstance(step, Hold)]
    assert hold.duration_s == 120 and hold.until is None
    recording = kinds.index("acquire"), len(kinds) - 1 - kinds[::-1].index("acquire")
    assert [protocol.steps[i].action for i in recording] == ["start", "stop"]
    beam_on = [s for s in protocol.steps[: recording[0]] if isinstance(s, Microscope) and s.beam]
    assert beam_on, "the beam is on before recording starts"


def test_shipped_control_protocol_holds_in_contact_without_bias() -> None:
    protocol = Protocol.load(PROTOCOLS / "lno_control_0v.yaml").validate_against(SafetyLimits())
    assert protocol.name == "lno_control_0v"
    assert not any(isinstance(step, Bias) for step in protocol.steps)
    kinds = [step.kind for step in protocol.steps]
    assert kinds.index("approach") < kinds.index("acquire") < kinds.index("hold")
    (hold,) = [step for step in protocol.steps if isinstance(step, Hold)]
    assert hold.duration_s == 60


def test_loaded_text_is_kept_as_written() -> None:
    protocol = Protocol.load(PROTOCOLS / "lno_4v3.yaml")
    assert protocol.text == (PROTOCOLS / "lno_4v3.yaml").read_text()


@pytest.mark.parametrize(
    ("steps_yaml", "expected"),
    [
        # wrong type
        ("- bias: {volts: high}", "step 2 (bias): volts: Input should be a valid number"),
        # unknown step, with the nearest name
        ("- biass: {volts: 1}", "step 2: unknown step 'biass'; did you mean bias?"),
        # unknown field, with the fields there are
        (
            "- bias: {voltz: 1}",
            "step 2 (bias): voltz: unknown field; expected volts, rate_volts_per_s",
        ),
        # negative duration
        ("- hold: {duration_s: -5}", "step 2 (hold): duration_s: Input should be greater than 0"),
        ("- wait: -1", "step 2 (wait): duration_s: Input should be greater than 0"),
        # missing setting
        ("- approach: {speed_nm_s: 100}", "step 2 (approach): max_travel_nm: required but missing"),
        # a value outside a fixed set
        ("- acquire: begin", "step 2 (acquire): action: Input should be 'start' or 'stop'"),
        ("- microscope: {mode: stem}", "step 2 (microscope): mode: Input should be 'lm' or"),
        ("- microscope: {}", "step 2 (microscope): set at least one of mode, beam"),
        ("- bias: {volts: .inf}", "step 2 (bias): volts: Input should be a finite number"),
        # shape of a step
        ("- {hold: 1, wait: 1}", "step 2: a step is one kind with its settings"),
        ("- 42", "step 2: a step is one kind with its settings"),
        # condition language errors are step errors too
        (
            "- hold: {duration_s: 60, until: rocksalt_fraction >= 0.9}",
            "step 2 (hold): until: unknown quantity 'rocksalt_fraction' at column 1; "
            "did you mean rock_salt_fraction?",
        ),
    ],
)
def test_every_error_is_one_line_naming_step_and_field(steps_yaml: str, expected: str) -> None:
    text = f"name: t\nsteps:\n  - mark: first\n  {steps_yaml}\n"
    with pytest.raises(ProtocolError) as excinfo:
        Protocol.parse(text, "yaml")
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(expected), message
    assert excinfo.value.step == 2


HRTEM_FIRST = "- microscope: {mode: hrtem}\n  "


@pytest.mark.parametrize(
    ("steps_yaml", "expected"),
    [
        (
            HRTEM_FIRST
            + "- hold: {duration_s: 60, interleave: {mode: lm, every_s: 5, dwell_s: 5}}",
            "step 3 (hold): interleave: dwell_s (5 s) must be shorter than every_s (5 s)",
        ),
        (
            HRTEM_FIRST
            + "- wait: {duration_s: 9, interleave: {mode: stem, every_s: 5, dwell_s: 1}}",
            "step 3 (wait): interleave.mode: Input should be 'lm' or 'hrtem'",
        ),
        (
            HRTEM_FIRST + "- hold: {duration_s: 60, interleave: {mode: lm, every_s: 5}}",
            "step 3 (hold): interleave.dwell_s: required but missing",
        ),
        (
            HRTEM_FIRST + "- hold: {duration_s: 60, interleave: {mode: lm, every: 5, dwell_s: 1}}",
            "step 3 (hold): interleave.every: unknown field; expected mode, every_s, dwell_s",
        ),
        (
            HRTEM_FIRST
            + "- hold: {duration_s: 60, interleave: {mode: lm, every_s: 0, dwell_s: 1}}",
            "step 3 (hold): interleave.every_s: Input should be greater than 0",
        ),
        # the mode to come back to must be known, and differ from the burst's
        (
            "- hold: {duration_s: 60, interleave: {mode: lm, every_s: 5, dwell_s: 1}}",
            "step 2 (hold): interleave: no earlier microscope step sets the mode to return to",
        ),
        (
            "- microscope: {mode: lm}\n  - microscope: {beam: on}\n  "
            "- hold: {duration_s: 60, interleave: {mode: lm, every_s: 5, dwell_s: 1}}",
            "step 4 (hold): interleave: the microscope is already in lm here",
        ),
    ],
)
def test_interleave_errors_name_the_step_and_field(steps_yaml: str, expected: str) -> None:
    text = f"name: t\nsteps:\n  - mark: first\n  {steps_yaml}\n"
    with pytest.raises(ProtocolError) as excinfo:
        Protocol.parse(text, "yaml")
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(expected), message
    assert excinfo.value.kind in ("hold", "wait")
    assert excinfo.value.field is not None and excinfo.value.field.startswith("interleave")


def test_interleave_describes_itself_and_round_trips() -> None:
    text = (
        "name: t\nsteps:\n  - microscope: {mode: hrtem}\n"
        "  - hold: {duration_s: 60, until: expansion >= 25%,"
        " interleave: {mode: lm, every_s: 5, dwell_s: 1, dose_rate_e_per_a2_s: 2}}\n"
    )
    protocol = Protocol.parse(text, "yaml")
    hold = protocol.steps[1]
    assert isinstance(hold, Hold) and hold.interleave is not None
    assert hold.describe() == (
        "hold until expansion >= 0.25 for 2 s (at most 60 s), LM bursts of 1 s every 5 s"
    )
    assert Protocol.parse(Protocol(name="t", steps=protocol.steps).text) == protocol


def test_shipped_until_rock_salt_protocol_is_the_reference_with_a_closed_loop_hold() -> None:
    closed = Protocol.load(PROTOCOLS / "lno_4v3_until_rocksalt.yaml")
    closed.validate_against(SafetyLimits())
    reference = Protocol.load(PROTOCOLS / "lno_4v3.yaml")
    (hold,) = [step for step in closed.steps if isinstance(step, Hold)]
    assert hold.until == "rock_salt_fraction >= 0.9 for 2 s" and hold.duration_s == 120
    assert hold.interleave is not None and hold.interleave.mode == "lm"

    # everything but the hold (and the marks' wording) is the reference experiment
    def plan(p: Protocol) -> list:
        return [s for s in p.steps if not isinstance(s, (Hold, Mark))]

    assert plan(closed) == plan(reference)


def test_error_names_the_file_and_reports_how_many_more(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: t\nsteps:\n  - hold: -1\n  - bias: {volts: x}\n")
    with pytest.raises(ProtocolError) as excinfo:
        Protocol.load(path)
    assert str(excinfo.value) == (
        "bad.yaml: step 1 (hold): duration_s: Input should be greater than 0 (+1 more)"
    )
    assert (excinfo.value.step, excinfo.value.kind, excinfo.value.field) == (
        1,
        "hold",
        "duration_s",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: t\nsteps: []\n", "steps: a protocol needs at least one step"),
        ("name: t\n", "steps: required but missing"),
        ("name: t\nstep: []\nsteps: [mark: x]\n", "step: unknown field; expected name"),
        ("- mark: x\n", "a protocol is a mapping with name, description and steps"),
        ("name: [t\n", "not valid YAML: line 2"),
    ],
)
def test_top_level_errors_are_one_line(text: str, expected: str) -> None:
    with pytest.raises(ProtocolError) as excinfo:
        Protocol.parse(text)
    assert "\n" not in str(excinfo.value)
    assert str(excinfo.value).startswith(expected), str(excinfo.value)


def test_protocol_errors_are_config_errors_for_the_cli() -> None:
    with pytest.raises(ConfigError):
        Protocol.parse("name: t\nsteps: []\n")


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (
            SafetyLimits(max_bias_volts=4.0),
            "step 10 (bias): volts: +4.3 V is beyond the station's maximum bias of 4 V",
        ),
        (
            SafetyLimits(max_ramp_rate_volts_per_s=0.2),
            "step 10 (bias): rate_volts_per_s: 0.5 V/s is beyond the station's maximum ramp rate",
        ),
    ],
)
def test_over_limit_bias_is_refused_at_load_naming_the_step(
    limits: SafetyLimits, expected: str
) -> None:
    protocol = Protocol.load(PROTOCOLS / "lno_4v3.yaml")
    with pytest.raises(ProtocolError) as excinfo:
        protocol.validate_against(limits)
    assert str(excinfo.value).startswith(expected), str(excinfo.value)
    assert excinfo.value.kind == "bias"


def test_negative_bias_beyond_the_limit_is_refused_too() -> None:
    protocol = Protocol(name="t", steps=[Bias(volts=-5.5)])
    with pytest.raises(ProtocolError, match=r"step 1 \(bias\): volts: -5.5 V"):
        protocol.validate_against(SafetyLimits())


def test_yaml_toml_and_python_give_the_same_protocol(tmp_path: Path) -> None:
    from_yaml = Protocol.parse(SMALL_YAML, "yaml")
    from_toml = Protocol.parse(SMALL_TOML, "toml")
    assert from_yaml == from_toml == SMALL_PYTHON
    # the format is told by extension, or by content when there is none
    (tmp_path / "small.toml").write_text(SMALL_TOML)
    (tmp_path / "small.yml").write_text(SMALL_YAML)
    (tmp_path / "small_toml_without_extension").write_text(SMALL_TOML)
    for name in ("small.toml", "small.yml", "small_toml_without_extension"):
        assert Protocol.load(tmp_path / name) == SMALL_PYTHON
    assert Protocol.parse(SMALL_TOML) == SMALL_PYTHON


def test_python_built_protocol_text_is_yaml_that_loads_back() -> None:
    text = SMALL_PYTHON.text
    assert "- bias: {volts: 4.3, rate_volts_per_s: 0.5}" in text
    assert Protocol.parse(text, "yaml") == SMALL_PYTHON


def test_python_built_protocol_validates_like_a_file() -> None:
    with pytest.raises(ValidationError):
        Protocol(name="t", steps=[Bias(volts=1.0), {"hold": {"duration_s": -1}}])
    with pytest.raises(ValidationError):
        Hold(duration_s=10, until="expansion >=")
    # dict steps in the file shape are accepted from Python as well
    mixed = Protocol(name="small", steps=[{"mark": "done"}, Wait(duration_s=2)])
    assert mixed.steps == (Mark(text="done"), Wait(duration_s=2))


def test_file_without_a_name_is_named_after_the_file(tmp_path: Path) -> None:
    path = tmp_path / "quick_check.yaml"
    path.write_text("steps:\n  - mark: hello\n")
    assert Protocol.load(path).name == "quick_check"


def test_unreadable_file_and_unknown_format_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match="No such file"):
        Protocol.load(tmp_path / "missing.yaml")
    with pytest.raises(ProtocolError, match="unknown protocol format 'json'"):
        Protocol.parse("{}", "json")
    with pytest.raises(ProtocolError, match="not valid TOML"):
        Protocol.parse("name = \n", "toml")


def test_hold_condition_is_stored_normalised_and_parsed() -> None:
    hold = Hold(duration_s=60, until="expansion>=25% or rock_salt_fraction>0.9")
    assert hold.until == "expansion >= 0.25 or rock_salt_fraction > 0.9 for 2 s"
    assert hold.condition is not None
    assert hold.condition.quantities == {"expansion", "rock_salt_fraction"}
    assert "at most 60 s" in hold.describe()


# A key given twice: YAML and JSON readers keep the last one without a word (a 6 s hold for a
# 600 s one, the first `steps:` list dropped); the file is refused, naming the key and line.
@pytest.mark.parametrize(
    ("name", "text", "fmt", "expected"),
    [
        (
            "block.yaml",
            "name: t\nsteps:\n  - hold:\n      duration_s: 600\n      duration_s: 6\n",
            None,
            "block.yaml: not valid YAML: line 5, column 7: duplicate key 'duration_s'"
            " (first on line 4)",
        ),
        (
            "flow.yaml",
            "name: t\nsteps:\n  - hold: {duration_s: 600, duration_s: 6}\n",
            None,
            "flow.yaml: not valid YAML: line 3, column 29: duplicate key 'duration_s'"
            " (first on line 3)",
        ),
        (  # inside a step's nested settings
            "nested.yaml",
            "name: t\nsteps:\n  - microscope: {mode: hrtem}\n"
            "  - hold:\n      duration_s: 60\n      interleave: {mode: lm, every_s: 5,\n"
            "                   dwell_s: 1, every_s: 50}\n",
            None,
            "nested.yaml: not valid YAML: line 7, column 32: duplicate key 'every_s'"
            " (first on line 6)",
        ),
        (
            "steps_twice.yaml",
            "name: t\nsteps:\n  - bias: 1\n  - hold: 600\nsteps:\n  - hold: 6\n",
            None,
            "steps_twice.yaml: not valid YAML: line 5, column 1: duplicate key 'steps'"
            " (first on line 2)",
        ),
        (  # JSON is read as YAML: the same loader, with the line
            "dup.json",
            '{\n  "name": "t",\n  "steps": [\n    {"hold": {"duration_s": 600}},\n'
            '    {"bias": {"volts": 1.0, "volts": 4.3}}\n  ]\n}\n',
            None,
            "dup.json: not valid YAML: line 5, column 29: duplicate key 'volts' (first on line 5)",
        ),
        (  # TOML refuses it itself, saying where; the line's text says what
            "dup.toml",
            'name = "t"\n[[steps]]\nhold = { duration_s = 600, duration_s = 6 }\n',
            "toml",
            "dup.toml: not valid TOML: Duplicate inline table key 'duration_s'"
            " (at line 3, column 42): hold = { duration_s = 600, duration_s = 6 }",
        ),
        (
            "name_twice.toml",
            'name = "t"\nname = "u"\n[[steps]]\nhold = 6\n',
            "toml",
            "name_twice.toml: not valid TOML: Cannot overwrite a value (at line 2, column 11):"
            ' name = "u"',
        ),
    ],
)
def test_a_key_given_twice_is_refused_naming_the_key_and_its_line(
    tmp_path: Path, name: str, text: str, fmt: str | None, expected: str
) -> None:
    with pytest.raises(ProtocolError) as parsed:
        Protocol.parse(text, fmt, name=name)
    assert str(parsed.value) == expected
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ProtocolError) as loaded:
        Protocol.load(path)
    assert str(loaded.value) == expected


def test_equal_values_under_different_keys_and_yaml_merge_keys_still_load() -> None:
    # the same key in different mappings is no duplicate: each hold has its own duration_s
    two_holds = Protocol.parse(
        "name: t\nsteps:\n  - hold: {duration_s: 5}\n  - hold: {duration_s: 5}\n"
    )
    assert two_holds.steps == (Hold(duration_s=5), Hold(duration_s=5))
    as_json = Protocol.parse('{"name": "t", "steps": [{"hold": {"duration_s": 5}}, {"hold": 5}]}')
    assert as_json == two_holds
    # a merge key's values may be overridden on purpose (YAML's `<<`): not a duplicate
    merged = Protocol.parse(
        "name: t\nsteps:\n  - hold: &slow {duration_s: 600}\n  - hold: {<<: *slow, duration_s: 6}\n"
    )
    assert merged.steps == (Hold(duration_s=600), Hold(duration_s=6))
    assert Protocol.parse(SMALL_YAML, "yaml") == SMALL_PYTHON
