"""The simulated Keithley 2400 SourceMeter's dialect: its command tree, settings and readings.

What comes from the 2400 manual (2400S-900-01): the *IDN? format, voltage source ranges
0.2/2/20/200 V and current measure ranges 1 uA..1 A (each usable to 105 %, queries report
105 % of nominal as the 2400 does), *RST defaults (compliance 105 uA, NPLC 1, auto ranges on,
output off-mode NORMal, all five FORM:ELEM items), the reading format and its status word
(bit 0 overflow, bit 2 front terminals, bit 3 real compliance, bits 11-13 V/I/R measured,
bit 14/15 V/I source, bit 22 remote sense), overflow readings of +9.9E37 and +9.91E37 for
"not measured", error +803 "Not permitted with OUTPUT off" for a reading with the output off,
and the error queue of 10 with -350 on overflow.

Simplifications, each refused loudly rather than faked: the current source function can be
selected but not switched on (-221); sweep/list modes, binary data formats and the trigger
model beyond INIT/FETC?/READ? are not simulated (-224 or -113). INIT measures at once (as if
followed by *WAI). Where the manual's optional roots overlap (`:VOLT:RANG` is both
[:SOURce] and [:SENSe]), SENSe wins, SCPI's default root, except for headers only SOURce has.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from ..scpi import (
    CommandTree,
    ScpiError,
    format_bool,
    format_error,
    format_number,
    parse_bool,
    parse_choice,
    parse_number,
    parse_string,
    split_outside_quotes,
)
from .common import (
    NOT_MEASURED,
    OVER_RANGE,
    OVERFLOW,
    VOLTAGE_RANGES,
    Sample,
    SourceMeterSimulator,
    SourceSettings,
    limit_query,
    select_range,
    short,
)

log = logging.getLogger(__name__)

DEFAULT_SERIAL = "4104473"
FIRMWARE = "C30   Mar 17 2006 09:29:29/A02  /K/J"
MODEL = "MODEL 2400"
VOLTAGE_COMPLIANCE_LIMITS = (0.2, 210.0)  # volts, :SENS:VOLT:PROT

# Status word bits (FORM:ELEM STAT).
STATUS_OVERFLOW = 1 << 0
STATUS_FRONT_TERMINALS = 1 << 2
STATUS_COMPLIANCE = 1 << 3
STATUS_VOLTAGE_MEASURED = 1 << 11
STATUS_CURRENT_MEASURED = 1 << 12
STATUS_RESISTANCE_MEASURED = 1 << 13
STATUS_VOLTAGE_SOURCE = 1 << 14
STATUS_CURRENT_SOURCE = 1 << 15
STATUS_REMOTE_SENSE = 1 << 22

# Device-specific errors of the 2400 (manual, table B-1).
ERROR_OUTPUT_OFF = 803
DEVICE_ERRORS = {ERROR_OUTPUT_OFF: "Not permitted with OUTPUT off"}

# Reading elements in the order the 2400 sends them, and sense functions.
ELEMENTS = ("VOLTage", "CURRent", "RESistance", "TIME", "STATus")
FUNCTIONS = ("VOLT", "CURR", "RES")
_FUNCTION_NAMES = {"VOLT": "VOLT:DC", "CURR": "CURR:DC", "RES": "RES"}
_FUNCTION_WORDS = {
    "VOLT": "VOLT",
    "VOLTAGE": "VOLT",
    "VOLT:DC": "VOLT",
    "VOLTAGE:DC": "VOLT",
    "CURR": "CURR",
    "CURRENT": "CURR",
    "CURR:DC": "CURR",
    "CURRENT:DC": "CURR",
    "RES": "RES",
    "RESISTANCE": "RES",
}


@dataclass
class Settings(SourceSettings):
    """Everything else *RST sets on a 2400 (defaults from the manual's command summary)."""

    voltage_mode: str = "FIXed"
    voltage_compliance: float = 21.0
    voltage_measure_range: float = 20.0
    voltage_measure_range_auto: bool = True
    functions: list[str] = field(default_factory=lambda: ["CURR"])
    concurrent: bool = True
    elements: set[str] = field(default_factory=lambda: set(ELEMENTS))
    auto_output_off: bool = False
    beeper: bool = True
    remote_sense: bool = False
    autozero: str = "ON"


@dataclass(frozen=True)
class Reading:
    volts: float
    amperes: float
    ohms: float
    time_s: float
    status: int

    def format(self, elements: set[str]) -> str:
        values = (self.volts, self.amperes, self.ohms, self.time_s, float(self.status))
        return ",".join(
            format_number(value)
            for name, value in zip(ELEMENTS, values, strict=True)
            if name in elements
        )


class Keithley2400Simulator(SourceMeterSimulator):
    """The 2400: one program message in, its reply line out."""

    MODEL = MODEL
    FIRMWARE = FIRMWARE
    DEFAULT_SERIAL = DEFAULT_SERIAL
    DEVICE_ERRORS = DEVICE_ERRORS
    SETTINGS = Settings
    settings: Settings
    _last_reading: Reading | None

    # ----- readings ----------------------------------------------------------------------------
    def _conversions(self) -> int:
        quantities = set(self.settings.functions)
        if "RES" in quantities:  # ohms needs a voltage and a current conversion
            quantities = (quantities - {"RES"}) | {"VOLT", "CURR"}
        return max(1, len(quantities))  # with none on, the source still measures one

    def _measure(self) -> Reading:
        """One reading: the integration in wall time, the sample at its middle."""
        s = self.settings
        switched_on = False
        if not s.output:
            if not s.auto_output_off:
                raise ScpiError(ERROR_OUTPUT_OFF, "reading with the output off")
            self._set_output(True)
            switched_on = True
        try:
            reading = self._reading(self._integrate(self._conversions()))
        finally:
            if switched_on:
                self._set_output(False)
        self._last_reading = reading
        return reading

    def _reading(self, sample: Sample) -> Reading:
        s = self.settings
        status = STATUS_FRONT_TERMINALS
        if s.source_function == "VOLTage":
            status |= STATUS_VOLTAGE_SOURCE
        else:
            status |= STATUS_CURRENT_SOURCE
        if sample.in_compliance:
            status |= STATUS_COMPLIANCE
        if s.remote_sense:
            status |= STATUS_REMOTE_SENSE
        current_value = NOT_MEASURED
        if "CURR" in s.functions:
            status |= STATUS_CURRENT_MEASURED
            current_value = sample.amperes
            if sample.overflow:
                current_value = math.copysign(OVERFLOW, sample.amperes)
                status |= STATUS_OVERFLOW
        # Unmeasured, the voltage element is the programmed source value (source readback off).
        volts_value = s.voltage_level
        if "VOLT" in s.functions:
            status |= STATUS_VOLTAGE_MEASURED
            volts_value = sample.volts
        ohms = NOT_MEASURED
        if "RES" in s.functions:
            status |= STATUS_RESISTANCE_MEASURED
            if sample.overflow:
                status |= STATUS_OVERFLOW
            elif sample.amperes != 0.0:
                ohms = sample.volts / sample.amperes
        return Reading(
            volts=volts_value,
            amperes=current_value,
            ohms=ohms,
            time_s=sample.time_s,
            status=status,
        )

    # ----- command tree ------------------------------------------------------------------------
    def _build_tree(self) -> CommandTree:
        t = CommandTree()
        self._add_common_commands(t)

        # SENSe before SOURce: where optional roots overlap, SENSe is the default root.
        t.add(
            "[:SENSe]:FUNCtion:CONCurrent",
            setter=self._set_concurrent,
            getter=lambda p: format_bool(self.settings.concurrent),
        )
        t.add("[:SENSe]:FUNCtion:ON:ALL", setter=self._functions_all_on, set_arguments=(0, 0))
        t.add("[:SENSe]:FUNCtion:OFF:ALL", setter=self._functions_all_off, set_arguments=(0, 0))
        t.add(
            "[:SENSe]:FUNCtion:OFF",
            setter=self._functions_off,
            getter=self._functions_off_query,
            set_arguments=(1, 3),
        )
        t.add(
            "[:SENSe]:FUNCtion[:ON]",
            setter=self._functions_on,
            getter=self._functions_query,
            set_arguments=(1, 3),
        )
        t.add(
            "[:SENSe]:CURRent[:DC]:PROTection[:LEVel]",
            setter=self._set_compliance,
            getter=self._compliance_query,
            query_arguments=(0, 1),
        )
        t.add("[:SENSe]:CURRent[:DC]:PROTection:TRIPped", getter=self._tripped_query)
        self._add_current_measure_commands(t)
        for quantity in ("VOLTage[:DC]", "RESistance"):
            t.add(
                f"[:SENSe]:{quantity}:NPLCycles",
                setter=self._set_nplc,
                getter=self._nplc_query,
                query_arguments=(0, 1),
            )
        t.add(
            "[:SENSe]:VOLTage[:DC]:PROTection[:LEVel]",
            setter=self._set_voltage_compliance,
            getter=self._voltage_compliance_query,
            query_arguments=(0, 1),
        )
        t.add(
            "[:SENSe]:VOLTage[:DC]:RANGe:AUTO",
            setter=self._set_voltage_measure_range_auto,
            getter=lambda p: format_bool(self.settings.voltage_measure_range_auto),
        )
        t.add(
            "[:SENSe]:VOLTage[:DC]:RANGe[:UPPer]",
            setter=self._set_voltage_measure_range,
            getter=self._voltage_measure_range_query,
            query_arguments=(0, 1),
        )

        self._add_source_commands(t)
        t.add(
            "[:SOURce]:VOLTage:MODE",
            setter=self._set_voltage_mode,
            getter=lambda p: short(self.settings.voltage_mode),
        )
        t.add(
            "[:SOURce]:CLEar:AUTO",
            setter=self._set_auto_output_off,
            getter=lambda p: format_bool(self.settings.auto_output_off),
        )
        t.add(
            "[:SOURce]:CLEar[:IMMediate]",
            setter=lambda p: self._set_output(False),
            set_arguments=(0, 0),
        )

        self._add_output_and_format_commands(t, ":OUTPut:SMODe")
        t.add(
            ":FORMat:ELEMents[:SENSe]",
            setter=self._set_elements,
            getter=self._elements_query,
            set_arguments=(1, 5),
        )

        t.add(":READ", getter=lambda p: self._measure().format(self.settings.elements))
        t.add(":FETCh", getter=self._fetch)
        t.add(":INITiate[:IMMediate]", setter=lambda p: self._measure(), set_arguments=(0, 0))
        t.add(":MEASure", getter=lambda p: self._measure_function(None))
        t.add(":CONFigure", getter=self._functions_query)
        for function, pattern in (
            ("VOLT", "VOLTage[:DC]"),
            ("CURR", "CURRent[:DC]"),
            ("RES", "RESistance"),
        ):
            t.add(f":MEASure:{pattern}", getter=lambda p, f=function: self._measure_function(f))
            t.add(
                f":CONFigure:{pattern}",
                setter=lambda p, f=function: self._configure(f),
                set_arguments=(0, 0),
            )

        self._add_error_commands(t)
        t.add(
            ":SYSTem:ERRor:ALL",
            getter=lambda p: ",".join(format_error(*e) for e in self.status.pop_all()),
        )
        t.add(
            ":SYSTem:LFRequency",
            setter=self._set_line_frequency,
            getter=lambda p: f"{self.line_frequency:.0f}",
        )
        t.add(":SYSTem:TIME", getter=lambda p: format_number(self._elapsed()))
        t.add(":SYSTem:TIME:RESet", setter=self._reset_time, set_arguments=(0, 0))
        t.add(
            ":SYSTem:BEEPer:STATe",
            setter=self._set_beeper,
            getter=lambda p: format_bool(self.settings.beeper),
        )
        t.add(":SYSTem:BEEPer[:IMMediate]", setter=self._beep, set_arguments=(2, 2))
        t.add(
            ":SYSTem:RSENse",
            setter=self._set_remote_sense,
            getter=lambda p: format_bool(self.settings.remote_sense),
        )
        t.add(
            ":SYSTem:AZERo[:STATe]",
            setter=self._set_autozero,
            getter=lambda p: self.settings.autozero,
        )
        t.add(":SYSTem:PRESet", setter=lambda p: self.reset(), set_arguments=(0, 0))
        t.add(":SYSTem:VERSion", getter=lambda p: "1996.0")
        return t

    # ----- sense -------------------------------------------------------------------------------
    def _parse_functions(self, params: list[str]) -> list[str]:
        functions: list[str] = []
        for param in params:
            for item in split_outside_quotes(parse_string(param), ","):
                name = _FUNCTION_WORDS.get(item.strip().upper())
                if name is None:
                    raise ScpiError(-224, f"unknown sense function {item!r}")
                if name not in functions:
                    functions.append(name)
        return functions

    def _functions_on(self, params: list[str]) -> None:
        s = self.settings
        wanted = self._parse_functions(params)
        if not s.concurrent:
            if len(wanted) > 1:
                raise ScpiError(-221, "one function at a time with concurrent measurements off")
            s.functions = wanted
            return
        s.functions = [f for f in FUNCTIONS if f in s.functions or f in wanted]

    def _functions_off(self, params: list[str]) -> None:
        unwanted = self._parse_functions(params)
        self.settings.functions = [f for f in self.settings.functions if f not in unwanted]

    def _functions_all_on(self, params: list[str]) -> None:
        if not self.settings.concurrent:
            raise ScpiError(-221, "concurrent measurements are off")
        self.settings.functions = list(FUNCTIONS)

    def _functions_all_off(self, params: list[str]) -> None:
        self.settings.functions = []

    def _functions_query(self, params: list[str]) -> str:
        return ",".join(f'"{_FUNCTION_NAMES[f]}"' for f in self.settings.functions)

    def _functions_off_query(self, params: list[str]) -> str:
        off = [f for f in FUNCTIONS if f not in self.settings.functions]
        return ",".join(f'"{_FUNCTION_NAMES[f]}"' for f in off)

    def _set_concurrent(self, params: list[str]) -> None:
        s = self.settings
        s.concurrent = parse_bool(params[0])
        if not s.concurrent and len(s.functions) > 1:
            s.functions = s.functions[-1:]

    def _set_voltage_compliance(self, params: list[str]) -> None:
        low, high = VOLTAGE_COMPLIANCE_LIMITS
        self.settings.voltage_compliance = parse_number(params[0], low, high, 21.0)

    def _voltage_compliance_query(self, params: list[str]) -> str:
        low, high = VOLTAGE_COMPLIANCE_LIMITS
        return limit_query(params, self.settings.voltage_compliance, low, high, 21.0)

    def _set_voltage_measure_range(self, params: list[str]) -> None:
        s = self.settings
        s.voltage_measure_range = select_range(
            params[0], s.voltage_measure_range, 20.0, VOLTAGE_RANGES
        )
        s.voltage_measure_range_auto = False

    def _voltage_measure_range_query(self, params: list[str]) -> str:
        r = VOLTAGE_RANGES
        value = self.settings.voltage_measure_range * OVER_RANGE
        return limit_query(params, value, r[0] * OVER_RANGE, r[-1] * OVER_RANGE, 21.0)

    def _set_voltage_measure_range_auto(self, params: list[str]) -> None:
        self.settings.voltage_measure_range_auto = parse_bool(params[0])

    # ----- source ------------------------------------------------------------------------------
    def _set_voltage_mode(self, params: list[str]) -> None:
        mode = parse_choice(params[0], ("FIXed", "SWEep", "LIST"))
        if mode != "FIXed":
            raise ScpiError(-224, f"source mode {mode} is not simulated")
        self.settings.voltage_mode = mode

    def _set_auto_output_off(self, params: list[str]) -> None:
        self.settings.auto_output_off = parse_bool(params[0])

    # ----- format, readings --------------------------------------------------------------------
    def _set_elements(self, params: list[str]) -> None:
        self.settings.elements = {parse_choice(p, ELEMENTS) for p in params}

    def _elements_query(self, params: list[str]) -> str:
        return ",".join(short(e) for e in ELEMENTS if e in self.settings.elements)

    def _fetch(self, params: list[str]) -> str:
        if self._last_reading is None:
            raise ScpiError(-230, "no reading since the last reset")
        return self._last_reading.format(self.settings.elements)

    def _configure(self, function: str) -> None:
        """:CONF:<function>: that function alone, and the output switched per reading."""
        self.settings.functions = [function]
        self.settings.auto_output_off = True

    def _measure_function(self, function: str | None) -> str:
        if function is not None:
            self._configure(function)
        else:
            self.settings.auto_output_off = True
        return self._measure().format(self.settings.elements)

    # ----- system ------------------------------------------------------------------------------
    def _set_beeper(self, params: list[str]) -> None:
        self.settings.beeper = parse_bool(params[0])

    def _beep(self, params: list[str]) -> None:
        parse_number(params[0], 65.0, 2e6)
        parse_number(params[1], 0.0, 7.9)
        if self.settings.beeper:
            log.info("sourcemeter: beep")

    def _set_remote_sense(self, params: list[str]) -> None:
        self.settings.remote_sense = parse_bool(params[0])

    def _set_autozero(self, params: list[str]) -> None:
        if params[0].upper() == "ONCE":
            return  # one zero now; the state is unchanged
        self.settings.autozero = "ON" if parse_bool(params[0]) else "OFF"
