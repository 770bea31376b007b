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
    f"{__package__}.{name}" for name in ("spectrum", "phasemap", "morphology", "front")
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
        }


MAX_SUMMED_FRAMES = 64  # bounds the ring's memory (64 x 2 MB at 1024 x 1024 uint16)
DOSE_ROW_STRIDE = 8  # rows sampled for a frame's mean counts (the dose bookkeeping)


@dataclass
class _Integration:
    """Running sum of the newest frames of one mode that reach a dose (module docstring)."""

    key: tuple | None = None  # (mode, shape, pixel size): a change starts a new sum
    frames: collections.deque = field(default_factory=collections.deque)  # (time, frame, mean)
    total: np.ndarray | None = None
    mean_counts: float = 0.0  # mean counts per pixel of the sum
    added: int = 0  # frames ever added (turns the rows sampled for the dose)

    def add(
        self, frame: np.ndarray, time_s: float, key: tuple, counts_per_px: float, window_s: float
    ) -> None:
        # A new field, or a frame older than the newest (it would break the window): restart.
        if key != self.key or self.total is None or (self.frames and time_s < self.frames[-1][0]):
            self.reset()
            self.key, self.total = key, np.zeros(frame.shape, dtype=np.float32)
        # The dose is a target, not a result: every 8th row estimates a frame's mean counts
        # (0.04 vs 0.34 ms at 1024 x 1024). The first row turns with each frame, so fringes
        # whose period is a multiple of the stride (the (003)'s 8 px at 0.06 nm/px) cannot
        # bias the sum's dose: over 8 frames every row is counted once.
        self.added += 1
        start = self.added % DOSE_ROW_STRIDE
        mean = float(frame[start::DOSE_ROW_STRIDE].mean(dtype=np.float64))
        self.frames.append((time_s, frame, mean))
        self.total += frame
        self.mean_counts += mean
        while len(self.frames) > 1 and (
            self.frames[0][0] <= time_s - window_s
            or len(self.frames) > MAX_SUMMED_FRAMES
            or self.mean_counts - self.frames[0][2] >= counts_per_px
        ):
            _, old, old_mean = self.frames.popleft()
            self.total -= old  # exact: counts are integers far below float32's 2**24
            self.mean_counts -= old_mean

    def reset(self) -> None:
        self.key, self.total, self.mean_counts = None, None, 0.0
        self.frames.clear()


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
        pixel_nm = float(pixel_size_nm)
        counts_per_px, window_s = self._dose_target(mode)
        integration = self._integrations[mode]
        integration.add(
            frame, float(time_s), (mode, frame.shape, pixel_nm), counts_per_px, window_s
        )
        self._newest = (mode, float(time_s), pixel_nm)

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
        return HrtemSum(summed, pixel_nm, time_s, settings, spectrum, mapped)

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
            positions,
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
