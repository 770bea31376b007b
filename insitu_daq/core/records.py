"""Records that flow from the parts of the daemon to the run writer, the event stream and metrics.

Bias samples travel in batches as a numpy structured array (bytes on the wire, not objects);
events are small and travel as dicts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# One bias/current reading. `time` is the run-clock midpoint of the SCPI query and
# `time_error` its half-width (DESIGN.md, Time).
BIAS_SAMPLE_DTYPE = np.dtype(
    [
        ("time", "<f8"),
        ("time_error", "<f8"),
        ("voltage", "<f8"),
        ("setpoint", "<f8"),
        ("current", "<f8"),
        ("status", "<u4"),
    ]
)


# A row whose status has this bit is not a reading but a change of the commanded terminal
# level: the source was told to output `setpoint` volts (0 when the output went off) during
# the SCPI write stamped by `time` +- `time_error`; `voltage` and `current` are NaN. They
# travel in the sample batches so they stay in time order with the readings, and the run
# writer keeps them apart (the setpoint log) and uses them for the per-frame bias: the
# source steps between readings, so a frame's bias is the commanded level at its time plus
# the measured offset, not an interpolation across a step. Bit 31: every source-meter
# driver keeps its raw status word within bits 0-30 (drivers/sourcemeter Reading checks it).
STATUS_LEVEL_CHANGE = np.uint32(1 << 31)


def level_change_mask(batch: np.ndarray) -> np.ndarray:
    """True for the rows of a BIAS_SAMPLE_DTYPE batch that are level changes, not readings."""
    return (batch["status"] & STATUS_LEVEL_CHANGE) != 0


def bias_samples(n: int = 0) -> np.ndarray:
    """An empty batch of `n` bias samples."""
    return np.zeros(n, dtype=BIAS_SAMPLE_DTYPE)


class EventKind:
    """Kinds of run events (the `kind` column of /entry/events)."""

    RUN = "run"  # run opened / closed
    STEP = "step"  # protocol step started / finished
    MARK = "mark"  # user annotation
    STATE = "state"  # paused / resumed / aborted
    BIAS = "bias"  # ramp started / reached, output on / off
    TRIP = "compliance_trip"
    INSTRUMENT = "instrument"  # lost / retried / back
    MICROSCOPE = "microscope"  # imaging mode / beam / dose rate set (steps, interleave bursts)
    DETECTOR = "detector"  # armed (its series id) / disarmed, when the station controls it
    TEMPERATURE = "temperature"  # a heating holder's level, its heater switched off
    GAP = "frame_gap"  # image_id gap
    DUPLICATE = "frame_duplicate"
    OUT_OF_ORDER = "frame_out_of_order"
    STALE = "stale_series"
    MALFORMED = "malformed_message"
    LAYOUT = "file_layout"  # the run file got new frame datasets: SWMR readers reopen it
    ERROR = "error"
    RECORDING_FAILED = "recording_failed"  # the run file stopped taking writes (disk full...)
    DOSE_BUDGET = "dose_budget"  # a region reached its dose budget: beam blanked (service/dose.py)


@dataclass(frozen=True)
class Event:
    time: float  # run-clock seconds
    kind: str
    message: str
    data: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
