"""Driver for a Keithley 2400-class SourceMeter over PyVISA (voltage source, current measure).

One method per verb of the instrument, thin on purpose: the daemon owns the safety logic
(limits, ramp rates, when to switch off); this class only says what the manual says. The
SCPI strings live in `_Scpi` and nowhere else; the transport (queries, checked settings, the
error queue, the time stamp) is `scpi.ScpiSourceMeter`'s.

Messages end in LF both ways (the 2400's GPIB and TCP setting; set the 2400's RS-232
terminator to LF too). The 2400 refuses a reading with the output off: +803 "Not permitted
with OUTPUT off", raised as `OutputOffError`.
"""

from __future__ import annotations

import logging

from . import OutputOffError, Reading, SourceMeterError
from .scpi import ScpiCommands, ScpiSourceMeter, reading_value

log = logging.getLogger(__name__)

# Status word bits of a reading (2400 manual, FORMat:ELEMents STATus).
STATUS_OVERFLOW = 1 << 0
STATUS_COMPLIANCE = 1 << 3
STATUS_RANGE_COMPLIANCE = 1 << 16

# The 2400's device-specific error for a reading with the output off (manual, table B-1).
ERROR_OUTPUT_OFF = 803


class _Scpi(ScpiCommands):
    """The 2400's command strings (manual section 18), in the short form."""

    ELEMENTS = ":FORM:ELEM VOLT,CURR,TIME,STAT"
    READING_FORMAT = (ScpiCommands.DATA_FORMAT_ASCII, ELEMENTS)
    SOURCE_VOLTAGE = ":SOUR:FUNC VOLT"
    FIXED_MODE = ":SOUR:VOLT:MODE FIX"
    NO_AUTO_OUTPUT_OFF = ":SOUR:CLE:AUTO OFF"  # the output stays on between readings
    VOLTAGE_RANGE = ":SOUR:VOLT:RANG {volts:.6E}"
    VOLTAGE_RANGE_AUTO = ":SOUR:VOLT:RANG:AUTO ON"
    CONCURRENT = ":SENS:FUNC:CONC ON"
    MEASURE_VOLTAGE_AND_CURRENT = ':SENS:FUNC "VOLT","CURR"'
    COMPLIANCE = ":SENS:CURR:PROT {amperes:.6E}"
    COMPLIANCE_QUERY = ":SENS:CURR:PROT?"
    CURRENT_RANGE = ":SENS:CURR:RANG {amperes:.6E}"
    CURRENT_RANGE_AUTO = ":SENS:CURR:RANG:AUTO ON"
    NPLC = ":SENS:CURR:NPLC {nplc:.6E}"
    TRIPPED = ":SENS:CURR:PROT:TRIP?"


# The elements `_Scpi.ELEMENTS` asks for, in the order the 2400 sends them.
_READING_ELEMENTS = ("volts", "amperes", "time_s", "status")


class Keithley2400(ScpiSourceMeter):
    """A Keithley 2400 SourceMeter used as a voltage source that measures current."""

    SCPI = _Scpi

    # ----- configuration -----------------------------------------------------------------------
    def configure_voltage_source(
        self,
        compliance_amperes: float,
        voltage_range_volts: float | None = None,
        current_range_amperes: float | None = None,
        nplc: float = 1.0,
    ) -> None:
        """Source voltage (fixed level), measure voltage and current, with a current limit.

        Ranges of None mean auto range. A fixed current range below the compliance caps the
        measurable current at that range: larger currents read as overflow (inf).
        """
        commands = [
            _Scpi.SOURCE_VOLTAGE,
            _Scpi.FIXED_MODE,
            _Scpi.NO_AUTO_OUTPUT_OFF,
            _Scpi.VOLTAGE_RANGE_AUTO
            if voltage_range_volts is None
            else _Scpi.VOLTAGE_RANGE.format(volts=voltage_range_volts),
            _Scpi.CONCURRENT,
            _Scpi.MEASURE_VOLTAGE_AND_CURRENT,
            _Scpi.COMPLIANCE.format(amperes=compliance_amperes),
            _Scpi.CURRENT_RANGE_AUTO
            if current_range_amperes is None
            else _Scpi.CURRENT_RANGE.format(amperes=current_range_amperes),
            _Scpi.NPLC.format(nplc=nplc),
            *_Scpi.READING_FORMAT,
        ]
        self._write_checked(*commands)

    def compliance(self) -> float:
        return float(self._query(_Scpi.COMPLIANCE_QUERY))

    # ----- measurement -------------------------------------------------------------------------
    def _query_reading(self) -> str:
        try:
            return self._query(_Scpi.READ)
        except SourceMeterError as exc:
            if ERROR_OUTPUT_OFF in exc.codes:  # the 2400 refuses a reading with it off
                raise OutputOffError(f"{_Scpi.READ!r} refused", exc.errors) from exc
            raise

    def _reading(self, reply: str, time_ns: int, half_width_ns: int, monotonic_ns: int) -> Reading:
        fields = reply.split(",")
        if len(fields) != len(_READING_ELEMENTS):
            raise SourceMeterError(f"unexpected :READ? reply {reply!r}")
        try:
            values = dict(zip(_READING_ELEMENTS, (reading_value(f) for f in fields), strict=True))
        except ValueError:
            raise SourceMeterError(f"unexpected :READ? reply {reply!r}") from None
        status = int(values["status"])
        return Reading(
            voltage=values["volts"],
            current=values["amperes"],
            status=status,
            instrument_time_s=values["time_s"],
            time_ns=time_ns,
            half_width_ns=half_width_ns,
            monotonic_ns=monotonic_ns,
            in_compliance=bool(status & STATUS_COMPLIANCE),
            overflow=bool(status & STATUS_OVERFLOW),
        )

    def in_compliance(self) -> bool:
        """Whether the source is limited by the current compliance right now (trip query)."""
        return self._query(_Scpi.TRIPPED) == "1"
