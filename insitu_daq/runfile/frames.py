"""One frame geometry's part of the run file: an NXdetector group of frames and their columns.

A run's frames follow the stream: a detector may start its series any time after the run
opened, or restart with another shape, channel set, pixel type or compression. Each geometry
(channels, shape, dtype, stored compression) gets its own `FrameStack`: the first the
contract's /entry/instrument/detector (NXdata /entry/data), later ones
/entry/instrument/detector_<k> (k = 1, 2, ...; NXdata /entry/frames_<k>), each with the same
datasets (runfile/writer.py makes them and the layout changes):

    data, data_<channel>   [n, y, x] per channel, one chunk per frame as received
    image_id, series_id, frame_time, detector_start_time, detector_stop_time,
    detector_series_date, received_time, detector_clock_offset(_errors)     [n]
    bias_voltage, current  [n] estimated from the bias log at frame_time (runfile/framebias.py)
    imaging_mode           [n] "hrtem", "lm", ..., "settling", "unknown"; "" until decided
    pixel_size             [n] m, the specimen-plane sampling of the frame (NaN: not known)
    dose_rate              [n] e/angstrom^2/s at the specimen, 0 with the beam blanked (NaN:
                           not known)
    dose                   [n] e/angstrom^2 the frame's exposure gave its field: the
                           imaging timeline's dose rate over the exposure (analysis/dose.py;
                           a settling frame too, at the higher rate while the switch ran)
    cumulative_dose        [n] e/angstrom^2, the sum of `dose` over this group's frames so
                           far (frames whose dose is not known add nothing)

Per-frame columns are written in batches (`write_pending_rows`): readers count frames by
`frame_time`; `data` may hold more rows until the next flush. Two columns are filled in
later, each when what decides it is known: the bias once readings bracket the frame's time
(or, at close, from the last readings), the imaging state once the daemon's watermark has
passed the frame's exposure end (core/imaging.py: decided by the frame's own time against the
microscope's timeline, never by arrival order; at close with what is known, the rest
"unknown"). A frame whose exposure overlaps a switch or the frame period after it is
"settling" (half one mode, half the other): readers skip it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from insitu_daq.core.imaging import ImagingState, ImagingTimeline, Verdict
from insitu_daq.drivers.stream2 import hdf5_filter_options
from insitu_daq.runfile.framebias import FrameBiasEstimator
from insitu_daq.runfile.h5util import fixed, growing, put, scalar
from insitu_daq.runfile.layout import FRAME_CUMULATIVE_DOSE, FRAME_DOSE

DATE_LENGTH = 40
MODE_LENGTH = 16
COLUMN_BATCH = 64  # frames whose per-frame columns are written together
UNDECIDED = ""  # imaging_mode of a frame not decided yet (while the run is written)
SETTLING = "settling"
UNKNOWN = "unknown"
PERIOD_RANGE_S = (1e-5, 10.0)  # a frame period learnt outside this is not believed
# A frame the imaging watermark has not passed this long (run s) after it is given up on
# ("unknown"), as the per-frame bias is: what is pending stays bounded when the daemon sends
# no watermark (no microscope) or stops sending one.
IMAGING_KEEP_S = 60.0


@dataclass(frozen=True)
class FrameGeometry:
    """What the detector datasets must hold: channel names, (rows, cols), dtype, compression."""

    channels: tuple[str, ...]
    shape: tuple[int, int]
    dtype: str  # numpy dtype string, e.g. "<u2"
    compression: str | None  # "bslz4" | "lz4" | None: the chunk format stored

    def filter_options(self) -> dict[str, Any]:
        return hdf5_filter_options(self.compression)

    def holds(self, other: FrameGeometry) -> bool:
        """Frames of `other` go into datasets made for this geometry (channel order aside)."""
        return (
            set(self.channels) == set(other.channels)
            and tuple(self.shape) == tuple(other.shape)
            and np.dtype(self.dtype) == np.dtype(other.dtype)
            and self.compression == other.compression
        )

    def describe(self) -> str:
        return (
            f"{len(self.channels)} channel(s) {self.shape[0]}x{self.shape[1]} {self.dtype} "
            f"{self.compression or 'raw'}"
        )


def data_name(index: int, channel: str) -> str:
    """The dataset of a geometry's channel: the first is `data` (the NXdata signal)."""
    return "data" if index == 0 else f"data_{channel}"


class FrameStack:
    """The datasets of one frame geometry in one NXdetector group, and its pending fills.

    `create` makes the group's datasets (in a writable, non-SWMR file); afterwards the
    stack only grows them. Not thread-safe: the run writer's one thread calls it.
    """

    def __init__(self, detector: h5py.Group, geometry: FrameGeometry) -> None:
        self.path = detector.name
        self.geometry = geometry
        self._detector = detector
        self._data: dict[str, h5py.Dataset] = {
            channel: detector[data_name(i, channel)] for i, channel in enumerate(geometry.channels)
        }
        names = ("image_id", "series_id", "frame_time", "detector_start_time")
        names += ("detector_stop_time", "detector_series_date", "received_time")
        names += ("detector_clock_offset", "detector_clock_offset_errors")
        self._row_datasets = [detector[name] for name in names]  # in the order of a row
        self._frame_time = detector["frame_time"]
        self._clock_offset = detector["detector_clock_offset"]
        self._clock_offset_err = detector["detector_clock_offset_errors"]
        self._bias = detector["bias_voltage"]
        self._current = detector["current"]
        self._mode = detector["imaging_mode"]
        self._pixel = detector["pixel_size"]
        self._dose = detector["dose_rate"]
        self._frame_dose = detector[FRAME_DOSE.name]
        self._cumulative_dose = detector[FRAME_CUMULATIVE_DOSE.name]
        self.frames = 0
        self._pending_rows: list[tuple[Any, ...]] = []
        # Per-frame bias: the times of the frames not filled in yet (from _bias_first on).
        self._bias_times: list[float] = []
        self._bias_first = 0
        self.frames_without_bias = 0  # given up on: no reading came within the window
        # Per-frame imaging: (frame_time, half exposure) of the frames not decided yet.
        self._imaging_times: list[float] = []
        self._imaging_halves: list[float] = []
        self._imaging_first = 0
        self.frames_without_imaging = 0  # given up on: the watermark never passed them
        self._half_exposure = 0.0  # of the last frame (a series has one count time)
        self.period_s: float | None = None  # learnt from consecutive image_ids
        self._last: tuple[int, int, float] | None = None  # series_id, image_id, frame_time

    # ----- layout ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        detector: h5py.Group,
        geometry: FrameGeometry,
        start: str,
        description: str,
        scalars: dict[str, tuple[Any, str | None]],
    ) -> FrameStack:
        """Make the datasets in `detector` (an empty NXdetector group)."""
        cls._create_frames(detector, geometry)
        growing(detector, "image_id", "<i8")
        growing(detector, "series_id", "<i8")
        growing(detector, "frame_time", "<f8", "s").attrs["start"] = start
        growing(detector, "detector_start_time", "<f8", "s")
        growing(detector, "detector_stop_time", "<f8", "s")
        growing(detector, "detector_series_date", f"S{DATE_LENGTH}").attrs["description"] = (
            "the detector's series_date (ISO 8601, its own clock): origin of its start/stop times"
        )
        growing(detector, "received_time", "<f8", "s")
        growing(detector, "bias_voltage", "<f8", "V")
        growing(detector, "current", "<f8", "A")
        growing(detector, "detector_clock_offset", "<f8", "s").attrs["description"] = (
            "run clock minus detector clock per frame's series (lower envelope of arrival delay)"
        )
        growing(detector, "detector_clock_offset_errors", "<f8", "s")
        growing(detector, "imaging_mode", f"S{MODE_LENGTH}").attrs["description"] = (
            "the microscope's imaging mode during the frame's exposure, by its time; "
            f"'{SETTLING}': the exposure overlaps a switch or the frame period after it; "
            f"'{UNKNOWN}': no state known; '': not decided yet (run still written)"
        )
        growing(detector, "pixel_size", "<f8", "m").attrs["description"] = (
            "pixel size in the specimen plane during the frame (NaN: not known or settling)"
        )
        growing(detector, "dose_rate", "<f8", "e/angstrom^2/s").attrs["description"] = (
            "dose rate at the specimen during the frame, 0 with the beam blanked (NaN: not known)"
        )
        for column in (FRAME_DOSE, FRAME_CUMULATIVE_DOSE):
            dataset = growing(detector, column.name, column.dtype, column.units)
            dataset.attrs["description"] = column.description
        for name, (value, units) in scalars.items():
            scalar(detector, name, value, units)
        scalar(detector, "detector_description", description or "unknown")
        return cls(detector, geometry)

    @staticmethod
    def _create_frames(detector: h5py.Group, geometry: FrameGeometry) -> None:
        rows, cols = geometry.shape
        for i, channel in enumerate(geometry.channels):
            dataset = detector.create_dataset(
                data_name(i, channel),
                shape=(0, rows, cols),
                maxshape=(None, rows, cols),
                chunks=(1, rows, cols),
                dtype=np.dtype(geometry.dtype),
                **geometry.filter_options(),
            )
            dataset.attrs["units"] = "counts"
            dataset.attrs["channel"] = channel
        scalar(detector, "compression", geometry.compression or "none")

    def replace_geometry(self, geometry: FrameGeometry) -> None:
        """Make the frame datasets anew for `geometry` (only while no frame is stored)."""
        if self.frames:
            raise RuntimeError(f"{self.path} holds frames: its geometry cannot change")
        detector = self._detector
        # Let go of the old datasets before unlinking them: an object unlinked while open
        # lives on until its last handle goes (see also RunWriter's fs_strategy).
        self._data = {}
        for i, channel in enumerate(self.geometry.channels):
            del detector[data_name(i, channel)]
        del detector["compression"]
        self._create_frames(detector, geometry)
        self.geometry = geometry
        self._data = {
            channel: detector[data_name(i, channel)] for i, channel in enumerate(geometry.channels)
        }

    # ----- frames ----------------------------------------------------------------------------
    def write(
        self,
        chunks: dict[str, bytes | memoryview | np.ndarray],
        row: tuple[Any, ...],
        half_exposure: float,
    ) -> None:
        """Store one frame's pixels now and keep its row of columns for the next batch.

        `row`: image_id, series_id, frame_time, detector start and stop, series date (text),
        received_time, clock offset and its error, in that order.
        """
        if len(self._pending_rows) >= COLUMN_BATCH:
            self.write_pending_rows()  # before this frame: a failure leaves it unwritten
        index = self.frames
        for channel, dataset in self._data.items():
            payload = chunks[channel]
            dataset.resize((index + 1, *dataset.shape[1:]))
            if isinstance(payload, np.ndarray):
                dataset[index] = payload
            else:
                dataset.id.write_direct_chunk((index, 0, 0), payload)
        image_id, series_id, frame_time = int(row[0]), int(row[1]), float(row[2])
        self._pending_rows.append((*row[:5], fixed(row[5], DATE_LENGTH), *row[6:]))
        self._bias_times.append(frame_time)
        self._imaging_times.append(frame_time)
        self._imaging_halves.append(half_exposure)
        self._half_exposure = half_exposure
        self._learn_period(series_id, image_id, frame_time)
        self.frames += 1

    def _learn_period(self, series_id: int, image_id: int, frame_time: float) -> None:
        last, self._last = self._last, (series_id, image_id, frame_time)
        if last is None or last[0] != series_id or image_id <= last[1]:
            return
        period = (frame_time - last[2]) / (image_id - last[1])
        if PERIOD_RANGE_S[0] < period < PERIOD_RANGE_S[1]:
            self.period_s = period

    def write_pending_rows(self) -> None:
        """Write the per-frame columns of the frames whose pixels are already in."""
        rows = self._pending_rows
        if not rows:
            return
        first = self.frames - len(rows)
        columns = list(zip(*rows, strict=True))
        for dataset, values in zip(self._row_datasets, columns, strict=True):
            put(dataset, first, np.array(values))
        nan = np.full(len(rows), np.nan)
        for dataset in (self._bias, self._current, self._pixel, self._dose, self._frame_dose):
            put(dataset, first, nan)
        put(self._cumulative_dose, first, nan)
        put(self._mode, first, np.full(len(rows), UNDECIDED.encode(), dtype=f"S{MODE_LENGTH}"))
        self._pending_rows = []

    def retime(
        self,
        first: int,
        frame_times: np.ndarray,
        offset: float,
        error: float,
        estimator: FrameBiasEstimator,
    ) -> None:
        """Rewrite frame_time of frames [first, first+len) after a better clock mapping;
        their bias and imaging are decided again at the new times."""
        self.write_pending_rows()
        last = first + len(frame_times)
        self._frame_time[first:last] = frame_times
        self._clock_offset[first:last] = offset
        self._clock_offset_err[first:last] = error
        pending = self._bias_first
        if last > pending:  # not filled in yet: they will be, at their new times
            start = max(first, pending)
            self._bias_times[start - pending : last - pending] = list(frame_times[start - first :])
        if first < pending:  # filled in already: again at the new times, if the log has them
            self._refill_bias(first, np.asarray(frame_times[: pending - first]), estimator)
        self._retime_imaging(first, frame_times)

    def _retime_imaging(self, first: int, frame_times: np.ndarray) -> None:
        pending = self._imaging_first
        last = first + len(frame_times)
        if last > pending:
            start = max(first, pending)
            self._imaging_times[start - pending : last - pending] = list(
                frame_times[start - first :]
            )
        if first < pending:  # decided already: decided again (a retime only moves times back)
            again = list(frame_times[: min(last, pending) - first])
            if last < pending:  # (rows after the retimed ones keep their times)
                again += list(self._frame_time[last:pending])
            self._imaging_times[:0] = again
            self._imaging_halves[:0] = [self._half_exposure] * len(again)
            self._imaging_first = first

    # ----- per-frame bias --------------------------------------------------------------------
    def fill_bias(self, estimator: FrameBiasEstimator, final: bool) -> None:
        """Estimate the bias at the frame times that readings now bracket (runfile/framebias.py)."""
        first = self._bias_first
        if first >= self.frames:
            return
        frame_times = np.asarray(self._bias_times)
        last_reading = estimator.last_reading_time
        if final:
            ready = len(frame_times)
        elif last_reading is None:
            ready = 0
        else:
            ready = int(np.searchsorted(frame_times, last_reading))
        # Frames no reading will ever bracket (no source-meter, or it stopped answering) are
        # given up on, left NaN, once they fall out of the window: pending stays bounded.
        stale = int(np.searchsorted(frame_times, frame_times[-1] - estimator.keep_s))
        if stale > ready:
            self.frames_without_bias += stale - ready
            self._bias_times = self._bias_times[stale:]
            self._bias_first = first + stale
            self.fill_bias(estimator, final)
            return
        if ready == 0:
            return
        self._estimate_bias(first, frame_times[:ready], estimator)
        self._bias_times = self._bias_times[ready:]
        self._bias_first = first + ready

    def _refill_bias(
        self, first: int, frame_times: np.ndarray, estimator: FrameBiasEstimator
    ) -> None:
        """Frames [first, first+len) were filled in, then retimed: estimate them again."""
        oldest = estimator.oldest_time
        if oldest is None or not len(frame_times):
            return
        skip = int(np.searchsorted(frame_times, oldest))  # older than the window: keep
        if skip >= len(frame_times):
            return
        self._estimate_bias(first + skip, frame_times[skip:], estimator)

    def _estimate_bias(
        self, first: int, frame_times: np.ndarray, estimator: FrameBiasEstimator
    ) -> None:
        """Bias and current of frames [first, first+len) at `frame_times`, into the file."""
        volts, amps = estimator.estimate(frame_times)
        self._bias[first : first + len(volts)] = volts
        self._current[first : first + len(volts)] = amps

    # ----- per-frame imaging -----------------------------------------------------------------
    def fill_imaging(self, timeline: ImagingTimeline, final: bool) -> int:
        """Decide the imaging state of the frames the watermark has passed, in frame order;
        at close (`final`) the rest become "unknown", as do frames IMAGING_KEEP_S behind the
        newest that it has not passed. Returns how many were decided."""
        first = self._imaging_first
        if not self._imaging_times:
            return 0
        settling = self.period_s if self.period_s is not None else 2 * self._half_exposure
        oldest_kept = self._imaging_times[-1] - IMAGING_KEEP_S
        modes: list[bytes] = []
        pixels: list[float] = []
        doses: list[float] = []
        frame_doses: list[float] = []
        for frame_time, half in zip(self._imaging_times, self._imaging_halves, strict=True):
            verdict = timeline.classify(frame_time, half, settling)
            if verdict is Verdict.NOT_YET and not final:
                if frame_time >= oldest_kept:
                    break  # later frames end later: they wait too
                self.frames_without_imaging += 1
            mode, pixel, dose = _imaging_columns(verdict)
            modes.append(fixed(mode, MODE_LENGTH))
            pixels.append(pixel)
            doses.append(dose)
            decided_in_time = verdict is not Verdict.NOT_YET
            frame_doses.append(
                timeline.dose(frame_time - half, frame_time + half) if decided_in_time else math.nan
            )
        decided = len(modes)
        if not decided:
            return 0
        self.write_pending_rows()  # the rows exist before their columns are filled
        self._mode[first : first + decided] = np.array(modes, dtype=f"S{MODE_LENGTH}")
        self._pixel[first : first + decided] = pixels
        self._dose[first : first + decided] = doses
        self._fill_dose(first, np.array(frame_doses))
        del self._imaging_times[:decided]
        del self._imaging_halves[:decided]
        self._imaging_first = first + decided
        return decided

    def _fill_dose(self, first: int, doses: np.ndarray) -> None:
        """Frames [first, first+len)'s dose, and their running sum from the frame before (read
        back: a retimed frame decided again is not counted twice)."""
        before = float(self._cumulative_dose[first - 1]) if first else 0.0
        self._frame_dose[first : first + len(doses)] = doses
        self._cumulative_dose[first : first + len(doses)] = before + np.nancumsum(doses)


def _imaging_columns(verdict: ImagingState | Verdict) -> tuple[str, float, float]:
    """(imaging_mode, pixel_size m, dose_rate) of a frame from its classification."""
    if isinstance(verdict, ImagingState):
        return verdict.mode, verdict.pixel_size_m, verdict.dose_rate_e_per_a2_s
    if verdict is Verdict.SETTLING:
        return SETTLING, math.nan, math.nan
    return UNKNOWN, math.nan, math.nan  # NO_STATE, or NOT_YET at close
