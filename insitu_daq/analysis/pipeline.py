"""One frame in, the live quantities out: the stateful glue between a stream of frames and the
pure measurements of spectrum.py, phasemap.py, morphology.py and front.py. No I/O, no threads.

`FrameAnalyzer.analyze(frame, time_s, mode, pixel_size_nm)` returns a flat dict of the
quantities that frame measures; a key present with None means "analysed, not measurable", a
key absent means "this frame does not measure that" (an LM frame has no d-spacings).

Keys (stable, each declared in quantities.py, which the run file's /entry/analysis logs, the
`analysis` topic, the metrics, conditions and report read), filled by the measurements the
analysis modules register (measurement.py) from what this class computes once per sum:
- HRTEM frames: `d_spacing_m.<reflection>` (measured d in metres, None when the reflection is
  not detected), `intensity.<reflection>` (relative power above background, see spectrum.py),
  and, with a phase map (below), `layered_fraction`, `disordered_fraction`,
  `rock_salt_fraction` (0-1 over the particle tiles of the field) and `layered_presence`,
  `disordered_presence`, `rock_salt_presence` (the share of those tiles in which the phase is
  seen at all: phasemap.py).
- LM frames: `projected_area_m2`, `expansion` (A / A_ref - 1), `front_position_nm`,
  `front_velocity_nm_s`.

Why HRTEM frames are summed, and over what. One 25 ms HRTEM frame at the simulator's low dose
holds ~0.15-0.3 counts/px: enough for the layered (003) (~70 sigma) but not for the rock-salt
rings or the phase map, which need ~4-5 counts/px (spectrum.py, phasemap.py). So every HRTEM
frame is added to a running sum (a ring of the frames, float32 sum; `add`), and the spectrum
and the phase map are taken of that sum (`measure`; `analyze` is both). The live process adds
every frame it receives and measures at most `max_rate_hz` times a second: a frame without a
result of its own still brings its dose, so the sum spans the same run time whatever the
measuring rate (measuring every other frame, and summing only those, made the rock-salt onset
0.1-0.6 s later in the reference field: over 2 s for 2 of 4 seeds). The sum is a dose, not a
time: it keeps the newest frames that together reach `hrtem_counts_per_px` mean counts per
pixel (older ones are dropped as soon as the rest still reach it), and never frames older than
`hrtem_integration_s` of run time, nor more than MAX_SUMMED_FRAMES. A fixed time window would
measure nothing whenever fewer frames than that dose arrive in it (a time-scaled simulated run,
a camera at a low frame rate, frames the live process skipped), and would blur more than needed
when the dose is high. The result is stamped with the newest frame's time: a phase entering the
field shows within the window (onset late by at most the window, and earlier the stronger it
is). Frames the live process never receives (a tap skip, the ingest behind) are not in the sum;
the frames of a result's sum are `last_integrated_frames`, reported with it.

One sum per imaging mode, kept across a switch: a protocol that looks at low magnification for
a second every few seconds (protocol `interleave`) returns to the same HRTEM field, and its
HRTEM sum goes on where it was (frames older than the window drop out as usual). A new pixel
size or frame shape for a mode starts that mode's sum afresh.

LM frames are summed the same way to `lm_counts_per_px`, within `lm_integration_s`.
Segmentation needs ~25 counts per vacuum pixel (morphology.py): one 25 ms LM frame at
35 e/A^2/s has ~87, but at the 2 e/A^2/s a protocol may use for LM looks only ~5. The front
moves ~5 nm/s at most, so the default 0.5 s window blurs it by at most ~2.5 nm.

Drift-corrected sums (`settings.drift.enabled`, the station's `[analysis] drift`; drift.py
says what is measured and why). Each frame is registered before it is added, against a
reference: the central square of its mode's sum, taken anew while the sum builds up to its
dose, then kept until the field has moved `refresh_px` from it (renewed with every frame, the
reference would pass each frame's error on to the next: a random walk, which took an LM
track 0.6 px behind in 3 s). Its shift is searched near the prediction (the newest drift
position moved on at the fitted rate), and the frame goes into the sum moved back to the
sum's anchor, the drift position the sum is aligned to (a sub-pixel Fourier shift; not below
`min_shift_px`), so a sum of a drifting field stays as sharp as one of a still field. The
frame's drift position (nm) joins the run's track, from which each result
reports its newest frame's position and the Theil-Sen rate (`drift_x_nm`, `drift_y_nm`,
`drift_rate_nm_s`). A new sum (a mode's first frame, a new pixel size or frame shape) is
anchored where the track predicts, so both modes' positions are one run-wide track in nm.
Off: no registration, no drift keys, the sums as before.

Expansion reference: the median projected area of the LM frames taken before the bias step
(at most the last `reference_frames` of them). The daemon says when the bias first left 0 V
(`bias_started`); the reference is frozen by the first LM frame at or after that time. Until
then (and in a run whose bias never leaves 0 V, the no-bias control) the expansion is measured
against the median of the first `reference_frames` LM frames, so the control reads ~0. No LM
frame before the bias step: expansion None ("no reference"), never a guess.

Phase maps run on a run-time cadence, not on every HRTEM result: at most one every
`phase_map_interval_s` of run time (the first HRTEM result maps; then the first result at
least that much later). A map costs ~0.75x a spectrum (bench/README.md). The rock-salt onset
is judged to 2 s (verify/accuracy.py), and in the reference run the map itself needs most of that
(phasemap.py: the rock salt has to cover half a corner tile); the cadence adds up to one
interval. Measured with this class on the reference field, 6 noise seeds: first persistent
rock-salt presence 1.55-1.93 s after the truth at 0.125 s, 1.55-2.05 s at 0.25 s. Hence
0.125 s: 8 maps per second of a real run, ~3 % of a core. Run time, because a time-scaled
simulated run moves the physics faster per wall second and needs the maps as often per run
second as a real one.

Front speed: Theil-Sen over the front positions of the last `front_window_s` (front.py),
stamped at the newest frame; it is the mean speed over that window.
"""

from __future__ import annotations

import collections
import logging
import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from .drift import (
    DEFAULT_DRIFT,
    DriftRate,
    DriftSettings,
    DriftTrack,
    Reference,
    drift_rate,
    measure_shift,
    registration_image,
    shift_image,
)
from .front import DEFAULT_FRONT, FrontSettings, measure_front
from .measurement import MODES, HrtemSum, LmSum, SumContext, registered
from .morphology import DEFAULT_SEGMENTATION, SegmentationSettings, measure_particle, segment
from .phasemap import DEFAULT_PHASE_MAP_SETTINGS, PhaseMapSettings, phase_map
from .reflections import DEFAULT_REFLECTIONS, ReflectionTable
from .spectrum import DEFAULT_SETTINGS, SpectrumSettings, analyze_frame

logger = logging.getLogger(__name__)

# The analysis modules whose registered measurements (measurement.py) fill a result, in the
# order of its keys: HRTEM d-spacings and intensities, then the phase map's shares; LM area and
# expansion, then the front. Named here, not left to import order (a test may import phasemap
# before spectrum); the imports above register them.
MEASURING_MODULES = tuple(
    f"{__package__}.{name}" for name in ("spectrum", "phasemap", "morphology", "front", "drift")
)


@dataclass(frozen=True)
class PipelineSettings:
    """How the live analysis runs; the measurement settings of each part are nested."""

    table: ReflectionTable = DEFAULT_REFLECTIONS
    hrtem_counts_per_px: float = 5.0  # dose summed before the spectrum and phase map
    hrtem_integration_s: float = 4.0  # ... from frames no older than this (run-clock s)
    lm_counts_per_px: float = 40.0  # dose summed before segmentation and the front
    lm_integration_s: float = 0.5  # ... from frames no older than this
    phase_map_interval_s: float = 0.125  # run s between phase maps (module docstring)
    reference_frames: int = 10  # LM frames before the bias step whose median area is A_ref
    # Wide enough for 2-3 low-magnification looks of a protocol that interleaves them every
    # 4 s (front_speed wants >= 6 points spanning half the window); the front's speed changes
    # over tens of seconds (shrinking core), so 10 s does not smear it.
    front_window_s: float = 10.0
    spectrum: SpectrumSettings = DEFAULT_SETTINGS
    phase_map: PhaseMapSettings = DEFAULT_PHASE_MAP_SETTINGS
    segmentation: SegmentationSettings = DEFAULT_SEGMENTATION
    front: FrontSettings = DEFAULT_FRONT
    drift: DriftSettings = DEFAULT_DRIFT

    def __post_init__(self) -> None:
        if not (self.hrtem_integration_s >= 0 and self.lm_integration_s >= 0):
            raise ValueError("hrtem_integration_s and lm_integration_s must be >= 0")
        if not (self.hrtem_counts_per_px >= 0 and self.lm_counts_per_px >= 0):
            raise ValueError("hrtem_counts_per_px and lm_counts_per_px must be >= 0")
        if not self.phase_map_interval_s >= 0:
            raise ValueError("phase_map_interval_s must be >= 0")
        if self.reference_frames < 1:
            raise ValueError("reference_frames must be at least 1")
        if not self.front_window_s > 0:
            raise ValueError("front_window_s must be positive")

    def to_record(self) -> dict[str, object]:
        """The parameters as plain values (for /entry/analysis/parameters)."""
        return {
            "reflections": self.table.to_records(),
            "hrtem_counts_per_px": self.hrtem_counts_per_px,
            "hrtem_integration_s": self.hrtem_integration_s,
            "lm_counts_per_px": self.lm_counts_per_px,
            "lm_integration_s": self.lm_integration_s,
            "phase_map_interval_s": self.phase_map_interval_s,
            "reference_frames": self.reference_frames,
            "front_window_s": self.front_window_s,
            "spectrum_threshold_sigma": self.spectrum.threshold_sigma,
            "phase_map_tile_px": self.phase_map.tile_px,
            "phase_map_threshold": self.phase_map.threshold,
            **({"drift_corrected": True} if self.drift.enabled else {}),
        }


DRIFT_TRACK_POINTS = 100  # drift positions kept per rate window (Theil-Sen is O(n^2))
DRIFT_RATE_REFIT_S = 0.25  # run s between fits of the rate the prediction uses
# Bounds the ring's memory: 64 x 2 MB at 1024 x 1024 uint16 (4 MB a frame shifted by drift).
MAX_SUMMED_FRAMES = 64
DOSE_ROW_STRIDE = 8  # rows sampled for a frame's mean counts (the dose bookkeeping)


@dataclass
class _Summed:
    """One frame of a sum: as added (shifted by its drift, or as it came), its mean counts,
    and the whole-pixel roll the sum has had since (re-anchoring)."""

    time_s: float
    image: np.ndarray
    mean: float
    roll: tuple[int, int] = (0, 0)


@dataclass
class _Integration:
    """Running sum of the newest frames of one mode that reach a dose (module docstring).

    With drift on (drift.py), the sum is aligned to its `anchor_px`, a drift position in the
    mode's pixels (row, col): each frame goes in moved back by its offset from the anchor
    (sub-pixel, unless below `min_shift_px`), and when the newest frame is `reanchor_px` from
    it the sum and the anchor move by whole pixels (a roll: exact, and the frames still in the
    sum are rolled the same when they leave)."""

    key: tuple | None = None  # (mode, shape, pixel size): a change starts a new sum
    frames: collections.deque[_Summed] = field(default_factory=collections.deque)
    total: np.ndarray | None = None
    mean_counts: float = 0.0  # mean counts per pixel of the sum
    added: int = 0  # frames ever added (turns the rows sampled for the dose)
    anchor_px: tuple[float, float] = (0.0, 0.0)
    last_offset_px: tuple[float, float] = (0.0, 0.0)
    # What frames are registered against (drift.py's central square of the sum), the drift
    # position it is aligned to, and its dose (mean counts per pixel): see FrameAnalyzer.
    reference: Reference | None = None
    reference_px: tuple[float, float] = (0.0, 0.0)
    reference_counts: float = 0.0

    def restarts(self, key: tuple, time_s: float) -> bool:
        """Whether a frame with this key and time starts the sum afresh: a new field, or a
        frame older than the newest (it would break the window)."""
        if key != self.key or self.total is None:
            return True
        return bool(self.frames) and time_s < self.frames[-1].time_s

    def start(self, key: tuple, shape: tuple[int, ...]) -> None:
        self.reset()
        self.key, self.total = key, np.zeros(shape, dtype=np.float32)

    def add(
        self,
        frame: np.ndarray,
        time_s: float,
        counts_per_px: float,
        window_s: float,
        offset_px: tuple[float, float] | None = None,
        min_shift_px: float = 0.0,
    ) -> None:
        """Add a frame (after `start` if `restarts`); `offset_px`: its drift from the anchor."""
        assert self.total is not None
        # The dose is a target, not a result: every 8th row estimates a frame's mean counts
        # (0.04 vs 0.34 ms at 1024 x 1024). The first row turns with each frame, so fringes
        # whose period is a multiple of the stride (the (003)'s 8 px at 0.06 nm/px) cannot
        # bias the sum's dose: over 8 frames every row is counted once.
        self.added += 1
        start = self.added % DOSE_ROW_STRIDE
        mean = float(frame[start::DOSE_ROW_STRIDE].mean(dtype=np.float64))
        image = frame
        if offset_px is not None:
            self.last_offset_px = offset_px
            if math.hypot(*offset_px) >= min_shift_px:
                image = shift_image(frame, -offset_px[0], -offset_px[1])
        self.frames.append(_Summed(time_s, image, mean))
        self.total += image
        self.mean_counts += mean
        while len(self.frames) > 1 and (
            self.frames[0].time_s <= time_s - window_s
            or len(self.frames) > MAX_SUMMED_FRAMES
            or self.mean_counts - self.frames[0].mean >= counts_per_px
        ):
            old = self.frames.popleft()
            # Exact for frames added as they came (integer counts, far below float32's 2**24);
            # a shifted one leaves float32 rounding (~1e-7 of its counts).
            self.total -= old.image if old.roll == (0, 0) else np.roll(old.image, old.roll, (0, 1))
            self.mean_counts -= old.mean

    def reanchor(self, by: tuple[int, int]) -> None:
        """Move the sum and its anchor by whole pixels (row, col)."""
        assert self.total is not None
        self.total = np.roll(self.total, by, (0, 1))
        for summed in self.frames:
            summed.roll = (summed.roll[0] + by[0], summed.roll[1] + by[1])
        self.anchor_px = (self.anchor_px[0] + by[0], self.anchor_px[1] + by[1])
        self.last_offset_px = (self.last_offset_px[0] - by[0], self.last_offset_px[1] - by[1])

    def reset(self) -> None:
        self.key, self.total, self.mean_counts = None, None, 0.0
        self.frames.clear()
        self.anchor_px = self.last_offset_px = (0.0, 0.0)
        self.reference = None


class FrameAnalyzer:
    """Live quantities from a stream of frames (module docstring). One per run."""

    def __init__(self, settings: PipelineSettings | None = None) -> None:
        self.settings = settings or PipelineSettings()
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new run)."""
        self._integrations = {mode: _Integration() for mode in MODES}
        self._next_phase_map_s = -math.inf  # run time the next phase map is due
        self._newest: tuple[str, float, float] | None = None  # mode, time, pixel nm of the last add
        self._bias_start_s: float | None = None
        self._pre_bias_areas: collections.deque[float] = collections.deque(
            maxlen=self.settings.reference_frames
        )
        self._first_areas: list[float] = []
        self.reference_area_nm2: float | None = None  # frozen at the bias step
        self._front: collections.deque[tuple[float, float | None]] = collections.deque()
        self.last_integrated_frames = 0
        self.last_reasons: dict[str, str] = {}  # why a quantity was None, for the log
        self.last_sum: SumContext | None = None  # what the last `measure` measured
        # Drift (drift.py): the run's track of positions (run s, x nm, y nm), thinned to
        # DRIFT_TRACK_POINTS per rate window; the newest position (for the prediction); each
        # mode's newest frame's position (None: not measured, with why); the rate as last fitted.
        self._track: collections.deque[tuple[float, float, float]] = collections.deque()
        self._drift_last: tuple[float, float, float] | None = None
        self._drift_position: dict[str, tuple[float, float] | None] = {}
        self._drift_reason: dict[str, str] = {}
        self._rate: tuple[float, DriftRate | None] = (-math.inf, None)

    # ----- inputs besides frames -------------------------------------------------------------
    def bias_started(self, time_s: float) -> None:
        """The bias first left 0 V at run time `time_s` (the expansion reference's end)."""
        if self._bias_start_s is None:
            self._bias_start_s = float(time_s)
            logger.info("bias step at %.3f s: expansion reference ends", time_s)

    # ----- frames ----------------------------------------------------------------------------
    def analyze(
        self, frame: np.ndarray, time_s: float, mode: str, pixel_size_nm: float
    ) -> dict[str, float | None]:
        """Add `frame` (2-D counts) and measure: the quantities of the module docstring."""
        self.add(frame, time_s, mode, pixel_size_nm)
        return self.measure()

    def add(self, frame: np.ndarray, time_s: float, mode: str, pixel_size_nm: float) -> None:
        """Add `frame` to its mode's dose sum without measuring (a frame that brings its dose
        but gets no result of its own: the live process adds every frame it receives and
        measures at most `max_rate_hz` times a second)."""
        frame = np.asarray(frame)
        if frame.ndim != 2:
            raise ValueError(f"a frame must be 2-D, not {frame.shape}")
        if not (math.isfinite(pixel_size_nm) and pixel_size_nm > 0):
            raise ValueError(f"pixel size {pixel_size_nm!r} nm is not a positive number")
        if mode not in MODES:
            raise ValueError(f"imaging mode {mode!r} not one of {MODES}")
        pixel_nm, time_s = float(pixel_size_nm), float(time_s)
        counts_per_px, window_s = self._dose_target(mode)
        integration = self._integrations[mode]
        key = (mode, frame.shape, pixel_nm)
        if integration.restarts(key, time_s):
            integration.start(key, frame.shape)
        drift = self.settings.drift
        offset = (
            self._register(integration, frame, time_s, mode, pixel_nm) if drift.enabled else None
        )
        integration.add(frame, time_s, counts_per_px, window_s, offset, drift.min_shift_px)
        if offset is not None and math.hypot(*offset) > drift.reanchor_px:
            integration.reanchor((round(offset[0]), round(offset[1])))
        self._newest = (mode, time_s, pixel_nm)

    def _register(
        self,
        integration: _Integration,
        frame: np.ndarray,
        time_s: float,
        mode: str,
        pixel_nm: float,
    ) -> tuple[float, float] | None:
        """The frame's drift from its sum's anchor (px: row, col), searched near the
        prediction (drift.py), and its drift position into the track; a new sum is anchored
        at the predicted position. None: not measurable (a blank frame)."""
        settings = self.settings.drift
        predicted = self._predicted_nm(time_s)
        if not integration.frames:  # a new sum: the prediction is its anchor
            if predicted is not None:
                integration.anchor_px = (predicted[1] / pixel_nm, predicted[0] / pixel_nm)
            offset = (0.0, 0.0)
        else:
            assert integration.total is not None
            counts_per_px, _ = self._dose_target(mode)
            region = settings.region_px if mode == "hrtem" else settings.lm_region_px
            if integration.reference is None or integration.reference_counts < counts_per_px:
                integration.reference = Reference.of(registration_image(integration.total, region))
                integration.reference_px = integration.anchor_px
                integration.reference_counts = integration.mean_counts
            ref = integration.reference_px
            anchor, last = integration.anchor_px, integration.last_offset_px
            near = (anchor[0] + last[0] - ref[0], anchor[1] + last[1] - ref[1])
            if predicted is not None:
                near = (predicted[1] / pixel_nm - ref[0], predicted[0] / pixel_nm - ref[1])
            moving = registration_image(frame, region)
            if mode == "hrtem":
                shift = measure_shift(
                    integration.reference, moving, near, settings.hrtem_search_px, refine=False
                )
            else:
                shift = measure_shift(
                    integration.reference, moving, near, settings.lm_search_px,
                    settings.lm_smooth_px,
                )  # fmt: skip
            if shift is None:
                self._drift_position[mode] = None
                self._drift_reason[mode] = "no contrast to register (blank frame or sum)"
                return None
            if math.hypot(shift.dy, shift.dx) > settings.refresh_px:  # overlap shrinking
                integration.reference = None
            offset = (ref[0] + shift.dy - anchor[0], ref[1] + shift.dx - anchor[1])
        row = integration.anchor_px[0] + offset[0]
        col = integration.anchor_px[1] + offset[1]
        x_nm, y_nm = col * pixel_nm, row * pixel_nm
        self._drift_position[mode] = (x_nm, y_nm)
        self._drift_last = (time_s, x_nm, y_nm)
        spacing = settings.rate_window_s / DRIFT_TRACK_POINTS
        if not self._track or time_s >= self._track[-1][0] + spacing:
            self._track.append((time_s, x_nm, y_nm))
        while self._track and self._track[0][0] < time_s - settings.rate_window_s:
            self._track.popleft()
        return offset

    def _predicted_nm(self, time_s: float) -> tuple[float, float] | None:
        """Where the field should be at `time_s` (x, y nm): the newest position moved on at
        the rate (refitted every DRIFT_RATE_REFIT_S of run time). None before any position."""
        if self._drift_last is None:
            return None
        fitted_at, rate = self._rate
        if not fitted_at <= time_s < fitted_at + DRIFT_RATE_REFIT_S:
            rate = self._drift_rate()
            self._rate = (time_s, rate)
        t, x, y = self._drift_last
        if rate is None:
            return x, y
        return x + rate.vx_nm_s * (time_s - t), y + rate.vy_nm_s * (time_s - t)

    def _drift_rate(self) -> DriftRate | None:
        times, xs, ys = zip(*self._track, strict=True) if self._track else ((), (), ())
        return drift_rate(times, xs, ys, self.settings.drift)

    def _drift_track(self, mode: str) -> DriftTrack | None:
        """The drift a result of `mode` reads (None: drift off)."""
        if not self.settings.drift.enabled:
            return None
        times, xs, ys = zip(*self._track, strict=True) if self._track else ((), (), ())
        position = self._drift_position.get(mode)
        return DriftTrack(position, times, xs, ys, self._drift_reason.get(mode, ""))

    def measure(self) -> dict[str, float | None]:
        """The quantities of the sum of the newest frame's mode, stamped at that frame's time
        (the module docstring's keys). ValueError if no frame was added since the reset."""
        if self._newest is None:
            raise ValueError("no frame added to measure")
        mode, time_s, pixel_nm = self._newest
        integration = self._integrations[mode]
        assert integration.total is not None
        self.last_integrated_frames = len(integration.frames)
        self.last_reasons = {}
        summed = integration.total
        sum_ = (
            self._hrtem(summed, time_s, pixel_nm)
            if mode == "hrtem"
            else self._lm(summed, time_s, pixel_nm)
        )
        self.last_sum = sum_
        values: dict[str, float | None] = {}
        for measurement in registered(mode, MEASURING_MODULES):
            measured = measurement.compute(sum_)
            values.update(measured.values)
            self.last_reasons.update(measured.reasons)
        return values

    def _dose_target(self, mode: str) -> tuple[float, float]:
        """(counts per pixel, window s) of a mode's sum."""
        settings = self.settings
        if mode == "hrtem":
            return settings.hrtem_counts_per_px, settings.hrtem_integration_s
        return settings.lm_counts_per_px, settings.lm_integration_s

    def _hrtem(self, summed: np.ndarray, time_s: float, pixel_nm: float) -> HrtemSum:
        """What the HRTEM measurements share: the spectrum, and the phase map when due."""
        settings = self.settings
        spectrum = analyze_frame(summed, pixel_nm, settings.table, settings.spectrum)
        mapped = None
        if self._phase_map_due(time_s):
            mapped = phase_map(summed, pixel_nm, settings.table, settings.phase_map)
        return HrtemSum(
            summed, pixel_nm, time_s, settings, spectrum, mapped, self._drift_track("hrtem")
        )

    def _phase_map_due(self, time_s: float) -> bool:
        """Maps on a grid of `phase_map_interval_s` of run time: a result at or after the due
        time maps and the next is due one interval later, so jittered frame times keep the
        cadence (waiting for a full interval after each map would lengthen it by up to a frame
        period). A gap of more than an interval, or time going back (a restarted run or sum),
        starts the grid afresh at this result."""
        interval = self.settings.phase_map_interval_s
        due = self._next_phase_map_s
        if time_s < due - interval:  # back in time
            due = -math.inf
        if time_s < due:
            return False
        due += interval
        self._next_phase_map_s = due if due > time_s else time_s + interval
        return True

    def _lm(self, summed: np.ndarray, time_s: float, pixel_nm: float) -> LmSum:
        """What the LM measurements share: the segmentation, the particle, the expansion
        reference, the front and its window of positions (kept across sums)."""
        settings = self.settings
        segmentation = segment(summed, pixel_nm, settings.segmentation)
        particle = measure_particle(segmentation)
        reference = self._expansion_reference(particle.area_nm2, time_s)
        front = measure_front(summed, segmentation, settings.front)
        self._front.append((time_s, front.position_nm))
        while self._front and self._front[0][0] < time_s - settings.front_window_s:
            self._front.popleft()
        times = [t for t, _ in self._front]
        positions = [p for _, p in self._front]
        return LmSum(
            summed, pixel_nm, time_s, settings, segmentation, particle, reference, front, times,
            positions, self._drift_track("lm"),
        )  # fmt: skip

    def _expansion_reference(self, area: float | None, time_s: float) -> float | None:
        """The area (nm^2) the expansion is measured against (module docstring), None before
        any LM area; an area before the bias step joins the reference."""
        before_bias = self._bias_start_s is None or time_s < self._bias_start_s
        if before_bias:
            if area is not None:
                self._pre_bias_areas.append(area)
                if len(self._first_areas) < self.settings.reference_frames:
                    self._first_areas.append(area)
            return statistics.median(self._first_areas) if self._first_areas else None
        if self.reference_area_nm2 is None and self._pre_bias_areas:
            self.reference_area_nm2 = statistics.median(self._pre_bias_areas)
            logger.info(
                "expansion reference: %.0f nm^2 from %d LM frames before the bias step",
                self.reference_area_nm2,
                len(self._pre_bias_areas),
            )
        return self.reference_area_nm2
