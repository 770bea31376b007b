"""Before a run starts: is the data folder there, writable, and big enough for the recording?

Writable means a test write and sync succeed: a file system can refuse writes it does not
report as read-only (ext4's emergency read-only after a disk error).

The daemon refuses a run (one line, with the figures) rather than start one that would fill
the disk halfway through, with the particle biased and nothing recorded after that point.

The planned recording is the protocol's longest duration with recording on (holds and waits
at their full `duration_s`, ramps at their rate, approaches over their whole travel, the
ramp-down the runner ends every run with) x the bytes per second the run file grows by:
frames per second x bytes per frame. Frames per second: measured from the detector stream
over its last 10 s (the ingest process sees every frame, recorded or not;
ingest_counters.StreamRate), or `[detector] default_frame_rate_hz` before it was heard.
Bytes per frame: the larger of the stored size measured (the largest 10 s mean of the last
hour) and the raw size x ASSUMED_COMPRESSION: frames of a blanked beam or an empty field
compress to almost nothing, a run's do not. bslz4 keeps a quarter or less of typical
counting-detector frames and half of the simulator's; assuming half errs on refusing a run
rather than failing it halfway.
Plus the per-frame columns and the bias log, small next to the pixels, and the reserve the
ingest holds to close the file (ingest/failure.py). Run-clock seconds are wall seconds x the
daemon's time scale (a simulated station run faster than real time).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from insitu_daq.control.protocol import Protocol
from insitu_daq.control.station import StationError
from insitu_daq.control.steps import STEPS, PlanState
from insitu_daq.core.config import SafetyLimits, StationConfig
from insitu_daq.core.records import BIAS_SAMPLE_DTYPE
from insitu_daq.ingest.failure import RESERVE_BYTES, classify_write_error

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
        """From the ingest's `stream_rate` (frames_per_s, peak_bytes_per_frame,
        raw_bytes_per_frame, compression), or the config's defaults when the detector has
        not been heard. A frame is planned at its measured size or at its raw size x
        ASSUMED_COMPRESSION, whichever is larger: frames of a blanked beam or an empty field
        compress to almost nothing, the run's will not."""
        bias_bytes_per_s = config.sampling.bias_rate_hz * BIAS_SAMPLE_DTYPE.itemsize
        detector = config.detector
        if stream_rate:
            fps = float(stream_rate["frames_per_s"])
            measured = float(stream_rate["peak_bytes_per_frame"])
            raw = float(stream_rate["raw_bytes_per_frame"])
            compression = str(stream_rate["compression"])
            heard = f"{fps:.3g} frames/s measured from the detector"
        else:
            fps = detector.default_frame_rate_hz
            measured = 0.0
            pixels = int(np.prod(detector.default_shape)) * _DTYPE_BYTES[detector.default_dtype]
            raw = float(pixels * len(detector.default_channels))
            compression = (
                "none" if detector.archive_compression == "none" else detector.default_compression
            )
            heard = f"detector not heard yet: {fps:g} frames/s from [detector] defaults"
        ratio = ASSUMED_COMPRESSION.get(compression, 1.0)
        per_frame = max(measured, raw * ratio)
        if measured >= raw * ratio:
            size = f"{_size(per_frame)} a frame measured"
        else:
            size = f"{_size(per_frame)} a frame: {_size(raw)} raw, {compression} assumed {ratio:g}"
            if stream_rate:
                size += f"; measured {_size(measured)}"
        per_frame += PER_FRAME_COLUMN_BYTES
        return cls(fps * per_frame + bias_bytes_per_s, f"{heard}, {size}")


@dataclass(frozen=True)
class RecordingPlan:
    run_s: float  # run-clock seconds the protocol takes at most
    recorded_s: float  # of which recording is on
    bytes: int  # planned growth of the run file
    rate: RecordingRate

    @classmethod
    def of(
        cls,
        protocol: Protocol,
        limits: SafetyLimits,
        rate: RecordingRate,
        time_scale: float,
        from_step: int = 0,
    ) -> RecordingPlan:
        """The plan of the whole protocol, or of what is left from step `from_step` (0-based:
        that step at its full length) when a paused run is resumed."""
        run_s, recorded_s = protocol_seconds(protocol, limits, from_step)
        planned = rate.bytes_per_s * recorded_s / time_scale
        return cls(run_s, recorded_s, int(planned), rate)

    def describe(self) -> str:
        return (
            f"{_size(self.bytes)} planned: {self.recorded_s:.0f} s recorded at"
            f" {_size(self.rate.bytes_per_s)}/s ({self.rate.source})"
        )


def protocol_seconds(
    protocol: Protocol, limits: SafetyLimits, from_step: int = 0
) -> tuple[float, float]:
    """(whole run, with recording on) at most, in run-clock seconds; from step `from_step`
    (0-based) on if given. Each step counts at its longest (its kind's `max_seconds`), from
    the bias and recording the steps before it leave."""
    state, total, recorded = PlanState(), 0.0, 0.0
    for index, step in enumerate(protocol.steps):
        spec = STEPS[step.kind]
        seconds = spec.max_seconds(step, state, limits) if index >= from_step else 0.0
        total += seconds
        if spec.recorded_seconds is not None and index >= from_step:
            recorded += spec.recorded_seconds(step, state, limits)
        else:
            recorded += seconds if state.recording else 0.0
        state = spec.after(step, state)
    # Every run ends with the bias made safe at the maximum rate, recording still on if the
    # protocol did not stop it (the runner stops it after the ramp-down).
    end = abs(state.bias_volts) / limits.max_ramp_rate_volts_per_s
    return total + end, recorded + (end if state.recording else 0.0)


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


def check_room(
    data_dir: Path, plan: RecordingPlan, min_free_bytes: int, what: str = "this run"
) -> DataDisk:
    """The data disk, if it can take the planned run; DataFolderError (one line) if not."""
    disk = data_disk(data_dir)
    if disk.problem is not None:
        raise DataFolderError(f"{disk.problem}: run refused")
    assert disk.free_bytes is not None
    _probe_write(data_dir)
    if disk.free_bytes < plan.bytes + RESERVE_BYTES + min_free_bytes:
        raise DataFolderError(
            f"not enough space in {data_dir} for {what}: {_size(disk.free_bytes)} free,"
            f" {plan.describe()}, + {_size(RESERVE_BYTES)} held to close the file"
            f" + {_size(min_free_bytes)} to keep free (recording.min_free_bytes)"
        )
    return disk


def _probe_write(data_dir: Path) -> None:
    """Write and sync a byte in the folder: the file system may refuse writes it does not
    report as read-only (ext4's emergency read-only after a disk error)."""
    try:
        with tempfile.TemporaryFile(dir=data_dir, prefix=".insitu-daq-probe-") as probe:
            probe.write(b"\0")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        failure = classify_write_error(exc, data_dir / "probe", "a test write before the run")
        raise DataFolderError(
            f"{failure.reason if failure else f'data folder {data_dir}: {exc}'}: run refused"
        ) from None


def _size(nbytes: float) -> str:
    """Bytes in binary units: `512 B`, `3.2 MiB`, `1.50 GiB`."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= scale:
            value = nbytes / scale
            return f"{value:.3g} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"
    return f"{nbytes:.0f} B"
