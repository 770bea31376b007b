"""Driver for a Keithley 2450 SourceMeter in its native SCPI set (voltage source, current measure).

The transport is `scpi.ScpiSourceMeter`'s; this module says what the 2450 Reference Manual
(2450-901-01) says, with its SCPI strings in `_Scpi` and nowhere else. (A 2450 switched to
`*LANG SCPI2400` emulation is driven with `model = "keithley2400"` instead.)

What differs from the 2400: the current limit is a source setting (`:SOUR:VOLT:ILIM`, tripped:
`:SOUR:VOLT:ILIM:TRIP?`); one measure function (current), the terminal voltage coming from
the source readback; the reading's elements are named in the `:READ?` query itself, from
the `defbuffer1` reading buffer, which must wrap (`:TRAC:FILL:MODE CONT`) so a 50 Hz log never
fills it. Its status words: the measure status (STAT) bit 1 is "questionable" and bit 3 the
front terminals (NOT compliance, as on the 2400); the source status (SOURSTAT) bit 5 is "in
the limit" and bit 7 "output on". `Reading.status` holds STAT in bits 0-7 and SOURSTAT in bits
8-15. The 2450 gives a reading with the output off; its SOURSTAT then says so, and `read()`
raises `OutputOffError` as the 2400 driver does.
"""

from __future__ import annotations

import math

from . import OutputOffError, Reading, SourceMeterError
from .scpi import ScpiCommands, ScpiSourceMeter, reading_value

# Measure status (STAT) bits of a buffer reading (manual, reading buffer status).
MEASURE_STATUS_QUESTIONABLE = 1 << 1
MEASURE_STATUS_FRONT_TERMINALS = 1 << 3
# Source status (SOURSTAT) bits.
SOURCE_STATUS_OVER_TEMPERATURE = 1 << 4
SOURCE_STATUS_LIMIT = 1 << 5
SOURCE_STATUS_REMOTE_SENSE = 1 << 6
SOURCE_STATUS_OUTPUT_ON = 1 << 7
SOURCE_STATUS_SHIFT = 8  # SOURSTAT's place in Reading.status


class _Scpi(ScpiCommands):
    """The 2450's native command strings, in the short form."""

    BUFFER = '"defbuffer1"'
    SOURCE_VOLTAGE = ":SOUR:FUNC VOLT"
    VOLTAGE_RANGE = ":SOUR:VOLT:RANG {volts:.6E}"
    VOLTAGE_RANGE_AUTO = ":SOUR:VOLT:RANG:AUTO ON"
    CURRENT_LIMIT = ":SOUR:VOLT:ILIM {amperes:.6E}"
    CURRENT_LIMIT_QUERY = ":SOUR:VOLT:ILIM?"
    TRIPPED = ":SOUR:VOLT:ILIM:TRIP?"
    READ_BACK = ":SOUR:VOLT:READ:BACK ON"  # the SOUR element is the measured terminal voltage
    MEASURE_CURRENT = ':SENS:FUNC "CURR"'
    CURRENT_RANGE = ":SENS:CURR:RANG {amperes:.6E}"
    CURRENT_RANGE_AUTO = ":SENS:CURR:RANG:AUTO ON"
    NPLC = ":SENS:CURR:NPLC {nplc:.6E}"
    BUFFER_WRAPS = f":TRAC:FILL:MODE CONT, {BUFFER}"
    # Measured current, source readback, seconds since the buffer's first reading, statuses.
    READ = f":READ? {BUFFER}, READ, SOUR, REL, STAT, SOURSTAT"


_READING_ELEMENTS = ("amperes", "volts", "time_s", "status", "source_status")


class Keithley2450(ScpiSourceMeter):
    """A Keithley 2450 SourceMeter used as a voltage source that measures current."""

    SCPI = _Scpi

    def configure_voltage_source(
        self,
        compliance_amperes: float,
        voltage_range_volts: float | None = None,
        current_range_amperes: float | None = None,
        nplc: float = 1.0,
    ) -> None:
        """Source voltage, measure current (and the voltage by readback), with a current limit.

        One checked batch, the limit in it, before any output-on. Ranges of None mean auto.
        """
        self._write_checked(
            _Scpi.SOURCE_VOLTAGE,
            _Scpi.VOLTAGE_RANGE_AUTO
            if voltage_range_volts is None
            else _Scpi.VOLTAGE_RANGE.format(volts=voltage_range_volts),
            _Scpi.CURRENT_LIMIT.format(amperes=compliance_amperes),
            _Scpi.READ_BACK,
            _Scpi.MEASURE_CURRENT,
            _Scpi.CURRENT_RANGE_AUTO
            if current_range_amperes is None
            else _Scpi.CURRENT_RANGE.format(amperes=current_range_amperes),
            _Scpi.NPLC.format(nplc=nplc),
            _Scpi.BUFFER_WRAPS,
            *_Scpi.READING_FORMAT,
        )

    def compliance(self) -> float:
        return float(self._query(_Scpi.CURRENT_LIMIT_QUERY))

    def in_compliance(self) -> bool:
        """Whether the source is limited by the current limit right now (trip query)."""
        return self._query(_Scpi.TRIPPED) == "1"

    def _reading(self, reply: str, time_ns: int, half_width_ns: int, monotonic_ns: int) -> Reading:
        fields = reply.split(",")
        if len(fields) != len(_READING_ELEMENTS):
            raise SourceMeterError(f"unexpected :READ? reply {reply!r}")
        try:
            values = dict(zip(_READING_ELEMENTS, (reading_value(f) for f in fields), strict=True))
            status, source_status = int(values["status"]), int(values["source_status"])
        except ValueError:
            raise SourceMeterError(f"unexpected :READ? reply {reply!r}") from None
        if not source_status & SOURCE_STATUS_OUTPUT_ON:
            raise OutputOffError(f"{_Scpi.READ!r}: source status {source_status} says output off")
        return Reading(
            voltage=values["volts"],
            current=values["amperes"],
            status=(status & 0xFF) | (source_status & 0xFF) << SOURCE_STATUS_SHIFT,
            instrument_time_s=values["time_s"],
            time_ns=time_ns,
            half_width_ns=half_width_ns,
            monotonic_ns=monotonic_ns,
            in_compliance=bool(source_status & SOURCE_STATUS_LIMIT),
            overflow=math.isinf(values["amperes"]),
        )
