"""The simulated Keithley 2450 SourceMeter's native SCPI dialect.

The same instrument physics and noise as the 2400 (`common.py`); what differs is what the
2450 Reference Manual (2450-901-01) says: *IDN? `KEITHLEY INSTRUMENTS INC.,MODEL 2450,...`,
`*LANG?` SCPI; the current limit of the voltage source is `[:SOURce]:VOLTage:ILIMit` (105 uA
after *RST, as on the 2400) with its `:TRIPped?`; one measure function; the terminal voltage
by source readback (`[:SOURce]:VOLTage:READ:BACK`); the output-off state under
`:OUTPut:VOLTage:SMODe`; readings from `:READ?`/`:FETCh?` with an optional buffer name and
element list (READ, SOUR, REL, STAT, SOURSTAT; READ alone by default).

Status words of a reading: the measure status (STAT) has bit 1 "questionable" (set on an
overflow here) and bit 3 the front terminals (always set: the model's terminals are the
front ones); the source status (SOURSTAT) has bit 5 "in the current limit" and bit 7 "output
on". The 2450 gives a reading with the output off too: SOURSTAT bit 7 is then clear.

The 2400's own headers (`:FORM:ELEM`, `:SENS:CURR:PROT`, `:SENS:FUNC:CONC`, `:SOUR:CLE:AUTO`)
are not in this tree, so a driver speaking the wrong dialect is refused with -113.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..scpi import (
    CommandTree,
    ScpiError,
    format_bool,
    format_number,
    parse_bool,
    parse_choice,
    parse_string,
    split_outside_quotes,
)
from .common import OVERFLOW, Sample, SourceMeterSimulator, SourceSettings

DEFAULT_SERIAL = "04412345"
FIRMWARE = "1.0.0i"  # the manual's *IDN? example
MODEL = "MODEL 2450"

BUFFERS = ("defbuffer1", "defbuffer2")
# The reading elements simulated, by their manual names.
ELEMENTS = ("READ", "SOUR", "REL", "STAT", "SOURSTAT")
_FUNCTION_WORDS = {"CURR": "CURR:DC", "CURR:DC": "CURR:DC", "CURRENT": "CURR:DC"}

MEASURE_STATUS_QUESTIONABLE = 1 << 1
MEASURE_STATUS_FRONT_TERMINALS = 1 << 3
SOURCE_STATUS_LIMIT = 1 << 5
SOURCE_STATUS_OUTPUT_ON = 1 << 7


@dataclass
class Settings(SourceSettings):
    """What else *RST sets on a 2450 (as far as simulated)."""

    read_back: bool = True  # *Model choice*: on, as the driver sets it anyway
    sense_function: str = "CURR:DC"
    buffer_fill_mode: str = "CONTinuous"


@dataclass(frozen=True)
class Reading:
    amperes: float  # READ: the measured current, OVERFLOW beyond the range
    source: float  # SOUR: the readback (measured) or the programmed source level
    relative_s: float  # REL
    status: int  # STAT
    source_status: int  # SOURSTAT

    def format(self, elements: list[str]) -> str:
        values = {
            "READ": self.amperes,
            "SOUR": self.source,
            "REL": self.relative_s,
            "STAT": float(self.status),
            "SOURSTAT": float(self.source_status),
        }
        return ",".join(format_number(values[name]) for name in elements)


class Keithley2450Simulator(SourceMeterSimulator):
    """The 2450 in its native SCPI: one program message in, its reply line out."""

    MODEL = MODEL
    FIRMWARE = FIRMWARE
    DEFAULT_SERIAL = DEFAULT_SERIAL
    SETTINGS = Settings
    settings: Settings
    _last_reading: Reading | None

    # ----- readings ----------------------------------------------------------------------------
    def _measure(self) -> Reading:
        """One reading, the output on or off (the 2450 does not refuse it)."""
        self._last_reading = self._reading(self._integrate(1))
        return self._last_reading

    def _reading(self, sample: Sample) -> Reading:
        s = self.settings
        status = MEASURE_STATUS_FRONT_TERMINALS
        amperes = sample.amperes
        if sample.overflow:
            amperes = math.copysign(OVERFLOW, sample.amperes)
            status |= MEASURE_STATUS_QUESTIONABLE
        source_status = 0
        if s.output:
            source_status |= SOURCE_STATUS_OUTPUT_ON
            if sample.in_compliance:
                source_status |= SOURCE_STATUS_LIMIT
        source = sample.volts if s.read_back else s.voltage_level
        return Reading(amperes, source, sample.time_s, status, source_status)

    def _read_query(self, params: list[str], fresh: bool) -> str:
        """:READ? / :FETCh? ["<buffer>"[, <element>...]]: READ alone when none is named."""
        if params:
            buffer = parse_string(params[0])
            if buffer not in BUFFERS:
                raise ScpiError(-224, f"unknown reading buffer {buffer!r}")
        elements = [p.strip().upper() for p in params[1:]] or ["READ"]
        for name in elements:
            if name not in ELEMENTS:
                raise ScpiError(-224, f"reading element {name!r} is not simulated")
        if fresh:
            reading = self._measure()
        elif self._last_reading is None:
            raise ScpiError(-230, "no reading since the last reset")
        else:
            reading = self._last_reading
        return reading.format(elements)

    # ----- command tree ------------------------------------------------------------------------
    def _build_tree(self) -> CommandTree:
        t = CommandTree()
        self._add_common_commands(t)
        t.add("*LANG", getter=lambda p: "SCPI")
        t.add(
            "[:SENSe]:FUNCtion[:ON]",
            setter=self._set_sense_function,
            getter=lambda p: f'"{self.settings.sense_function}"',
        )
        self._add_current_measure_commands(t)

        self._add_source_commands(t)
        t.add(
            "[:SOURce]:VOLTage:ILIMit[:LEVel]",
            setter=self._set_compliance,
            getter=self._compliance_query,
            query_arguments=(0, 1),
        )
        t.add("[:SOURce]:VOLTage:ILIMit[:LEVel]:TRIPped", getter=self._tripped_query)
        t.add(
            "[:SOURce]:VOLTage:READ:BACK",
            setter=self._set_read_back,
            getter=lambda p: format_bool(self.settings.read_back),
        )

        self._add_output_and_format_commands(t, ":OUTPut:VOLTage:SMODe")
        t.add(
            ":TRACe:FILL:MODE",
            setter=self._set_fill_mode,
            getter=lambda p: "CONT" if self.settings.buffer_fill_mode == "CONTinuous" else "ONCE",
            set_arguments=(1, 2),
            query_arguments=(0, 1),
        )
        arguments = (0, 1 + len(ELEMENTS))  # a buffer name, then elements
        t.add(":READ", getter=lambda p: self._read_query(p, True), query_arguments=arguments)
        t.add(":FETCh", getter=lambda p: self._read_query(p, False), query_arguments=arguments)
        self._add_error_commands(t)
        return t

    # ----- settings ----------------------------------------------------------------------------
    def _set_sense_function(self, params: list[str]) -> None:
        words = split_outside_quotes(parse_string(params[0]), ",")
        names = [_FUNCTION_WORDS.get(word.strip().upper()) for word in words]
        if len(names) != 1 or names[0] is None:
            raise ScpiError(-224, f"only one current function is simulated, not {params[0]}")
        self.settings.sense_function = names[0]

    def _set_read_back(self, params: list[str]) -> None:
        self.settings.read_back = parse_bool(params[0])

    def _set_fill_mode(self, params: list[str]) -> None:
        mode = parse_choice(params[0], ("CONTinuous", "ONCE"))
        if len(params) > 1 and parse_string(params[1]) not in BUFFERS:
            raise ScpiError(-224, f"unknown reading buffer {params[1]}")
        self.settings.buffer_fill_mode = mode
