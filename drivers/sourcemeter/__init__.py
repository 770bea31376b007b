"""Source-meter drivers: the model-neutral types here, one module per model's SCPI dialect.

`scpi.py` is the VISA/SCPI transport every model shares (queries, checked settings, the error
queue, the midpoint time stamp of a reading); `keithley2400.py` and the other model modules
say only what their manual says. The station config's `source_meter.model` picks one
(insitu_daq/control/instruments/factory.py); callers see the `SourceMeter` protocol and the
types below, never a model's class. Importing this package loads no VISA library.
"""

from __future__ import annotations

from dataclasses import dataclass

# A reading's raw status word stays below this: bit 31 is the bias log's level-change marker.
STATUS_WORD_LIMIT = 1 << 31

# The standard SCPI error number callers may want to tell apart (a level beyond the range).
ERROR_DATA_OUT_OF_RANGE = -222


class SourceMeterError(Exception):
    """The instrument refused something (its queued errors attached) or could not be reached."""

    def __init__(self, message: str, errors: list[tuple[int, str]] | None = None) -> None:
        self.errors = errors or []
        detail = "; ".join(f"{code} {text}" for code, text in self.errors)
        super().__init__(f"{message}: {detail}" if detail else message)

    @property
    def codes(self) -> list[int]:
        return [code for code, _ in self.errors]


# Named like the holder driver's HolderTimeout: the service catches it by this name.
class SourceMeterTimeout(SourceMeterError, TimeoutError):  # noqa: N818
    """No reply within the timeout and nothing in the error queue to explain it."""


class OutputOffError(SourceMeterError):
    """A reading was asked for with the output off (switched off behind the caller's back)."""


@dataclass(frozen=True)
class Identity:
    """The four *IDN? fields as the instrument words them (model: "MODEL 2400")."""

    manufacturer: str
    model: str
    serial: str
    firmware: str


@dataclass(frozen=True)
class Reading:
    """One reading, model-neutral: the driver tells what its status word means.

    `current` is +/-inf on overflow (beyond the fixed range). `status` is the model's raw
    status word, kept within bits 0-30: the bias log marks its level-change rows with bit 31
    (core/records.py STATUS_LEVEL_CHANGE).
    """

    voltage: float  # volts at the terminals (measured)
    current: float  # amperes
    status: int  # the model's status word (its manual's meaning)
    instrument_time_s: float  # the instrument's own timestamp (since power-on or a reset)
    time_ns: int  # host wall time of the query's midpoint
    half_width_ns: int  # half the query's duration: the uncertainty of time_ns
    monotonic_ns: int = 0  # the same midpoint on time.monotonic_ns(), for run clocks
    in_compliance: bool = False  # the source was limited by the current compliance
    overflow: bool = False  # the current was beyond the measure range

    def __post_init__(self) -> None:
        if not 0 <= self.status < STATUS_WORD_LIMIT:
            raise ValueError(f"status word {self.status:#x} outside bits 0-30")
