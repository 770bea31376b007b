"""Before a run starts: is the data folder there, writable, and big enough for the recording?

The daemon refuses a run (one line, with the figures) rather than start one that would fill
the disk halfway through, with the particle biased and nothing recorded after that point.

The planned recording is the protocol's longest duration with recording on (holds and waits
at their full `duration_s`, ramps at their rate, approaches over their whole travel, the
ramp-down the runner ends every run with) x the bytes per second the run file grows by:
- measured: the detector stream's frames per second and stored bytes per frame over its last
  10 s (the ingest process measures every frame it receives, recorded or not; when the stream
  has stopped, those of the last series seen), or
- planned from the config before the detector was heard: `[detector] default_shape` and
  `default_dtype` at `default_frame_rate_hz`, compressed by ASSUMED_COMPRESSION (bslz4 keeps
  about a quarter or less of counting-detector frames; assuming half errs on refusing a run).
Plus the per-frame columns and the bias log, small next to the pixels. Run-clock seconds are
wall seconds x the daemon's time scale (a simulated station run faster than real time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import SafetyLimits, StationConfig
from .protocol import Acquire, Approach, Bias, Hold, Protocol, Retract, Step, Wait
from .records import BIAS_SAMPLE_DTYPE
from .station import StationError

# Stored size / raw size assumed for a compression before the stream was measured.
ASSUMED_COMPRESSION = {"bslz4": 0.5, "lz4": 0.75, "none": 1.0}
PER_FRAME_COLUMN_BYTES = 100  # image_id, frame_time, detector times, bias... (~12 columns)
_DTYPE_BYTES = {"uint8": 1, "uint16": 2, "uint32": 4}


class DataFolderError(StationError):
    """The data folder cannot take the run (missing, read-only, too full); one line."""


@dataclass(frozen=True)
class RecordingRate:
    bytes_per_s: float  # wall seconds
    source: str  # where the figure comes from, for the refusal

    @classmethod
    def of_stream(cls, stream_rate: dict[str, Any] | None, config: StationConfig) -> RecordingRate:
        """From the ingest's measured `stream_rate` ({frames_per_s, bytes_per_frame}), or
        the config's defaults when the detector has not been heard."""
        bias_bytes_per_s = config.sampling.bias_rate_hz * BIAS_SAMPLE_DTYPE.itemsize
        if stream_rate:
            fps = float(stream_rate["frames_per_s"])
            per_frame = float(stream_rate["bytes_per_frame"]) + PER_FRAME_COLUMN_BYTES
            source = f"{fps:.3g} frames/s of {_size(per_frame)} measured from the detector"
        else:
            detector = config.detector
            raw = int(np.prod(detector.default_shape)) * _DTYPE_BYTES[detector.default_dtype]
            compression = (
                "none" if detector.archive_compression == "none" else detector.default_compression
            )
            ratio = ASSUMED_COMPRESSION[compression]
            fps = detector.default_frame_rate_hz
            per_frame = raw * len(detector.default_channels) * ratio + PER_FRAME_COLUMN_BYTES
            source = (
                f"detector not heard yet: {fps:g} frames/s of {_size(per_frame)} assumed from"
                f" [detector] defaults, {compression} at {ratio:g} of raw"
            )
        return cls(fps * per_frame + bias_bytes_per_s, source)


@dataclass(frozen=True)
class RecordingPlan:
    run_s: float  # run-clock seconds the protocol takes at most
    recorded_s: float  # of which recording is on
    bytes: int  # planned growth of the run file
    rate: RecordingRate

    @classmethod
    def of(
        cls, protocol: Protocol, limits: SafetyLimits, rate: RecordingRate, time_scale: float
    ) -> RecordingPlan:
        run_s, recorded_s = protocol_seconds(protocol, limits)
        planned = rate.bytes_per_s * recorded_s / time_scale
        return cls(run_s, recorded_s, int(planned), rate)

    def describe(self) -> str:
        return (
            f"{_size(self.bytes)} planned: {self.recorded_s:.0f} s recorded at"
            f" {_size(self.rate.bytes_per_s)}/s ({self.rate.source})"
        )


def step_seconds(step: Step, bias_volts: float, limits: SafetyLimits) -> float:
    """The longest a step can take (run-clock s), the bias being at `bias_volts` before it."""
    if isinstance(step, (Hold, Wait)):
        return step.duration_s
    if isinstance(step, Bias):
        rate = step.rate_volts_per_s or limits.max_ramp_rate_volts_per_s
        return abs(step.volts - bias_volts) / rate
    if isinstance(step, Approach):
        return step.max_travel_nm / step.speed_nm_s
    if isinstance(step, Retract):
        return step.distance_nm / step.speed_nm_s
    return 0.0  # acquire, microscope, mark: instant next to these


def protocol_seconds(protocol: Protocol, limits: SafetyLimits) -> tuple[float, float]:
    """(whole run, with recording on) at most, in run-clock seconds."""
    bias, recording, total, recorded = 0.0, False, 0.0, 0.0
    for step in protocol.steps:
        seconds = step_seconds(step, bias, limits)
        total += seconds
        recorded += seconds if recording else 0.0
        if isinstance(step, Bias):
            bias = step.volts
        elif isinstance(step, Acquire):
            recording = step.action == "start"
    # Every run ends with the bias made safe at the maximum rate, recording still on if the
    # protocol did not stop it (the runner stops it after the ramp-down).
    end = abs(bias) / limits.max_ramp_rate_volts_per_s
    return total + end, recorded + (end if recording else 0.0)


@dataclass(frozen=True)
class DataDisk:
    """The data folder's file system now; None figures when the folder is not there."""

    free_bytes: int | None
    size_bytes: int | None
    writable: bool
    problem: str | None  # why it is not writable


def data_disk(data_dir: Path) -> DataDisk:
    try:
        stat = os.statvfs(data_dir)
    except OSError as exc:
        return DataDisk(None, None, False, f"data folder {data_dir}: {exc.strerror}")
    free, size = stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize
    if not data_dir.is_dir():
        return DataDisk(free, size, False, f"data folder {data_dir} is not a folder")
    if stat.f_flag & os.ST_RDONLY:
        return DataDisk(free, size, False, f"data folder {data_dir} is on a read-only file system")
    if not os.access(data_dir, os.W_OK):
        return DataDisk(free, size, False, f"data folder {data_dir} is not writable by this user")
    return DataDisk(free, size, True, None)


def check_room(data_dir: Path, plan: RecordingPlan, min_free_bytes: int) -> DataDisk:
    """The data disk, if it can take the planned run; DataFolderError (one line) if not."""
    disk = data_disk(data_dir)
    if disk.problem is not None:
        raise DataFolderError(f"{disk.problem}: run refused")
    assert disk.free_bytes is not None
    if disk.free_bytes < plan.bytes + min_free_bytes:
        raise DataFolderError(
            f"not enough space in {data_dir} for this run: {_size(disk.free_bytes)} free,"
            f" {plan.describe()}, + {_size(min_free_bytes)} to keep free"
            " (recording.min_free_bytes)"
        )
    return disk


def _size(nbytes: float) -> str:
    """Bytes in binary units: `512 B`, `3.2 MiB`, `1.50 GiB`."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"
