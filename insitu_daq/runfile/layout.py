"""Where things are in a run file: its paths and its growing logs, declared once.

The layout is a contract (DESIGN.md; tests/runfile/test_runfile_layout.py): the writer (writer.py)
builds it from these declarations, the closing step (finish.py), the report (report/), the
figure and the demo read it through them. The live analysis's part, /entry/analysis, is
declared per quantity in analysis/quantities.py (runfile/analysislog.py builds it).

A `Log` is one NXlog that grows during the run: a `time` column [s since /entry/start_time]
with the run's start in its @start, optionally `time_errors` (the half-width of each stamp),
and its columns. A log fed by a generic wire series (ingest `write_series`) names it in
`record`; its rows are (time, *columns) as float64.

No numpy here: the daemon and the report import it.
"""

from __future__ import annotations

from dataclasses import dataclass

ENTRY = "/entry"
START_TIME = "/entry/start_time"
END_TIME = "/entry/end_time"
RUN_ID = "/entry/run_id"
TITLE = "/entry/title"
PROTOCOL = "/entry/protocol"
PROTOCOL_FILE_NAME = "/entry/protocol/file_name"
INSTRUMENT = "/entry/instrument"
SOURCE_METER = "/entry/instrument/source_meter"
HOLDER = "/entry/instrument/holder"
MICROSCOPE = "/entry/instrument/microscope"
MICROSCOPE_MODE = "/entry/instrument/microscope/mode"  # the mode at the run's start
SAMPLE = "/entry/sample"
ANALYSIS = "/entry/analysis"
DETECTOR = "/entry/instrument/detector"  # the first frame geometry's NXdetector
DATA = "/entry/data"  # the NXdata of the first geometry's frames (the entry's default)

KIND_LENGTH = 32  # bytes of an event's kind
MESSAGE_LENGTH = 256  # bytes of an event's message


def detector(stack: int) -> str:
    """The NXdetector of the `stack`-th frame geometry of the run (runfile/frames.py)."""
    return DETECTOR if stack == 0 else f"{DETECTOR}_{stack}"


def stack_of(name: str) -> int | None:
    """Which frame geometry the NXdetector `name` (a member of INSTRUMENT) holds (None: it is
    not a frame geometry's)."""
    base = DETECTOR.rsplit("/", 1)[1]
    if name == base:
        return 0
    number = name.removeprefix(f"{base}_")
    return int(number) if number != name and number.isdecimal() else None


def frames_nxdata(stack: int) -> str:
    """The NXdata linking the `stack`-th geometry's frames (not "data_<k>": RosettaSciIO's
    use_default takes every NXdata path containing the default's, /entry/data)."""
    return DATA if stack == 0 else f"{ENTRY}/frames_{stack}"


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str
    units: str | None = None
    description: str = ""


@dataclass(frozen=True)
class Log:
    """One NXlog that grows during the run."""

    path: str
    columns: tuple[Column, ...]
    time_errors: bool = False  # a `time_errors` column [s]: each stamp's half-width
    time_from: str | None = None  # a log whose time (and time_errors) this one links to
    chunk: int = 1024  # rows per HDF5 chunk
    description: str = ""  # the group's @description
    record: str | None = None  # the generic wire series (ingest write_series) feeding it
    # A per-frame column of this name in each NXdetector: the log's first column interpolated
    # at frame_time, as bias_voltage is (runfile/frameseries.py); NaN without a reading.
    per_frame: str | None = None

    @property
    def time(self) -> str:
        return f"{self.path}/time"

    def row_fields(self) -> list[tuple[str, str]]:
        """The fields of one row as a generic series sends it: time (and time_errors), then
        the columns (a numpy structured dtype's description)."""
        times = [("time", "<f8"), *([("time_errors", "<f8")] if self.time_errors else [])]
        return [*times, *((column.name, column.dtype) for column in self.columns)]

    def column(self, name: str) -> str:
        """A column's path (`time` and `time_errors` included)."""
        if name not in ("time", "time_errors") and name not in (c.name for c in self.columns):
            raise KeyError(f"{self.path} has no column {name!r}")
        return f"{self.path}/{name}"


BIAS_VOLTAGE = Log(
    "/entry/sample/bias_voltage",
    (Column("value", "<f8", "V"), Column("setpoint", "<f8", "V")),
    time_errors=True,
)
CURRENT = Log(
    "/entry/sample/current",
    (
        Column("value", "<f8", "A"),
        Column(
            "status",
            "<u4",
            # Its bits are the model's (a 2400's bit 3 is compliance, a 2450's is not); the
            # identity next to it says which model wrote them.
            description="raw status word of each reading, in the bits of the source-meter model"
            " named by /entry/instrument/source_meter/identity",
        ),
    ),
    time_errors=True,
    time_from=BIAS_VOLTAGE.path,  # one reading gives both: one time
)
OUTPUT_LEVEL = Log(
    "/entry/instrument/source_meter/output_level",
    (Column("value", "<f8", "V"),),
    time_errors=True,
    description=(
        "commanded terminal level (0 V with the output off), stamped by the SCPI write that"
        " set it (midpoint, half-width in time_errors); frames' bias_voltage is this level"
        " at frame_time plus the measured offset interpolated between readings"
    ),
)
HOLDER_POSITION = Log(
    "/entry/instrument/holder/position",
    (Column("value", "<f8", "nm"),),
    time_errors=True,  # stamped at the midpoint of the status query (control/.../monitor.py)
    record="holder_position",
)
# A heating holder's (drivers/heating_holder.py SERIES). Celsius: the controller, the protocol
# and the limits speak it; "degC" is UDUNITS' symbol, which NeXus units follow (NX_TEMPERATURE),
# so a reader wanting K converts exactly.
TEMPERATURE = Log(
    "/entry/sample/temperature",
    (Column("value", "<f8", "degC"), Column("setpoint", "<f8", "degC")),
    time_errors=True,  # stamped at the midpoint of the status query, as the holder position
    record="holder_temperature",
    description="the heating chip's temperature and the controller's ramping setpoint",
    per_frame="temperature",
)
HEATER = Log(
    "/entry/instrument/holder/heater",
    (Column("power", "<f8", "W"), Column("resistance", "<f8", "ohm")),
    time_errors=True,  # (its own time: a generic series writes every column it declares)
    record="holder_heater",
    description="the heating chip's heater power and resistance",
)

# Each frame's electron dose, columns of every NXdetector group (runfile/frames.py fills them
# once the frame's imaging state is decided).
FRAME_DOSE = Column(
    "dose", "<f8", "e/angstrom^2", "dose the frame's exposure gave its field (NaN: not known)"
)
FRAME_CUMULATIVE_DOSE = Column(
    "cumulative_dose",
    "<f8",
    "e/angstrom^2",
    "sum of dose over this group's frames up to this one (unknown doses add nothing)",
)

# Electron dose per region (analysis/dose.py, service/dose.py): what each stretch of beam-on
# time gave one field of the specimen. The map at close (finish.py) is made from these rows.
DOSE = "/entry/dose"  # NXcollection: the exposure log and the map
DOSE_MAP = "/entry/dose/map"  # NXdata at close: dose [y, x] per cell, x, y (nm), @cell_size
DOSE_EXPOSURE = Log(
    "/entry/dose/exposure",
    (
        Column("duration", "<f8", "s", "beam-on run time this row covers, from its time"),
        Column("dose", "<f8", "e/angstrom^2", "dose given to the field in that time"),
        Column("x_min", "<f8", "nm", "the field on the specimen (stage + image shift)"),
        Column("x_max", "<f8", "nm"),
        Column("y_min", "<f8", "nm"),
        Column("y_max", "<f8", "nm"),
        Column("budget", "<f8", "e/angstrom^2", "the dose budget per region then in force"),
    ),
    chunk=256,
    description=(
        "electron dose given to each field of the specimen, one row per field per ~0.5 s of"
        " beam-on time; a point's dose is the sum over the rows whose field holds it"
    ),
    record="dose_exposure",
)
EVENTS = Log(
    "/entry/events",
    (Column("kind", f"S{KIND_LENGTH}"), Column("message", f"S{MESSAGE_LENGTH}")),
    chunk=64,
)

# Every growing log outside /entry/analysis, in the order the writer makes them.
LOGS: tuple[Log, ...] = (
    HOLDER_POSITION,
    BIAS_VOLTAGE,
    CURRENT,
    OUTPUT_LEVEL,
    TEMPERATURE,
    HEATER,
    EVENTS,
    DOSE_EXPOSURE,  # the dose given to each field (service/dose.py)
)
# The logs fed by generic wire series, by series name.
SERIES: dict[str, Log] = {log.record: log for log in LOGS if log.record}
# The logs with a per-frame column in each NXdetector.
PER_FRAME: tuple[Log, ...] = tuple(log for log in LOGS if log.per_frame)
