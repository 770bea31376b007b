"""The report figure (`insitu-daq report RUN.h5` -> RUN.png): a run at a glance, from its file.

Left, against run time (s since /entry/start_time), sharing one axis: bias and current, the
chip's temperature and its setpoint when the run has a temperature log (a heating holder), then
a panel for each row the analysis quantities declare (analysis/quantities.py `panel`): the
tracked reflections' intensities; the phase fractions; the reaction front's position; the
projected-area growth. The hold is marked (dashed lines) and the low-magnification stretches of the
recording are shaded, so an LM-only quantity (front, area growth) is seen to come from those and
the HRTEM ones (reflections, phases) from between them. Right, key HRTEM images (just after the
hold starts, its middle, just before it ends) with their FFT power spectra (log scale): what the
numbers on the left were measured from. A single low-dose frame is mostly shot noise, so each
key image is the sum of the settled HRTEM frames within KEY_IMAGE_SPAN_S of its time (as live
analysis integrates them), at most MAX_FRAMES_SUMMED.

Only the run file is read (analysis groups may be missing: the panel then says "not
measured"). matplotlib with the Agg backend: no display needed, safe in a daemon or over ssh.
The figure's pixel size is fixed (FIGURE_SIZE_IN x DPI) so that it is the same for every run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from insitu_daq.analysis.display import (
    ring_radius_fraction,
    spectrum_image,
    spectrum_reach,
    stretch,
)
from insitu_daq.analysis.quantities import Quantity, registered
from insitu_daq.analysis.reflections import DEFAULT_REFLECTIONS, ReflectionTable
from insitu_daq.report.analysis import AnalysisRecord, Series, read_analysis
from insitu_daq.report.events import HoldSpan, hold_span, imaging_modes, mode_at, read_events
from insitu_daq.report.frames import event_modes, sum_rows
from insitu_daq.report.temperature import read_temperature
from insitu_daq.runfile import layout
from insitu_daq.runfile.h5util import open_for_reading, read_column, read_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)

FIGURE_SIZE_IN = (16.0, 11.0)
DPI = 100  # -> 1600 x 1100 px
KEY_FRAME_EDGE_S = 2.0  # key frames this far inside the hold's ends
KEY_IMAGE_SPAN_S = 1.0  # run seconds of frames summed into one key image
MAX_FRAMES_SUMMED = 40  # one second at the camera's 40 fps
TITLE_LENGTH = 110
CROP_PX = 256  # the key image shows its centre at about one screen pixel per frame pixel
PHASE_COLOURS = {"layered": "tab:blue", "disordered": "tab:orange", "rock_salt": "tab:red"}


@dataclass(frozen=True)
class DrawnFigure:
    """What was drawn: the PNG, which panels had data ("not measured" if not), the key frames."""

    path: Path
    panels: dict[str, bool]  # panel -> measured
    key_frames: list[KeyFrame]


@dataclass(frozen=True)
class KeyFrame:
    """A key image: the sum of `frames` frames from `index` (the one nearest `time_s`) on."""

    label: str
    index: int
    time_s: float
    mode: str | None
    image: np.ndarray  # float64 sum
    frames: int
    pixel_nm: float | None = None  # specimen-plane sampling (None: not recorded)


def _centre_crop(image: np.ndarray, edge: int) -> np.ndarray:
    rows, cols = image.shape
    top, left = max(0, (rows - edge) // 2), max(0, (cols - edge) // 2)
    return image[top : top + edge, left : left + edge]


def _key_frame_times(hold: HoldSpan | None, frame_time: np.ndarray) -> list[tuple[str, float]]:
    if hold is not None:
        end = hold.end_s if hold.end_s is not None else float(frame_time[-1])
        edge = min(KEY_FRAME_EDGE_S, max(0.0, (end - hold.start_s) / 4))
        start, stop = hold.start_s + edge, end - edge
        return [("hold start", start), ("hold middle", 0.5 * (start + stop)), ("hold end", stop)]
    first, last = float(frame_time[0]), float(frame_time[-1])
    return [
        ("first frames", first),
        ("middle", 0.5 * (first + last)),
        ("last frames", last),
    ]


def _settled_in(changes: list[tuple[float, str]], frame_time: np.ndarray, mode: str) -> np.ndarray:
    """Frames taken in `mode` at least SETTLE_S (report/frames.py) after the switch into it."""
    if not changes:
        return np.ones(len(frame_time), dtype=bool)
    return event_modes(changes, frame_time) == mode


def _stretch(candidates: np.ndarray, frame_time: np.ndarray, centre: int) -> list[int]:
    """Consecutive candidate frames around `centre` spanning at most KEY_IMAGE_SPAN_S and
    MAX_FRAMES_SUMMED frames: one uninterrupted stretch of one mode."""
    first = last = centre
    while last - first + 1 < MAX_FRAMES_SUMMED:
        after, before = last + 1, first - 1
        if (
            after < len(frame_time)
            and candidates[after]
            and frame_time[after] - frame_time[first] < KEY_IMAGE_SPAN_S
        ):
            last = after
        elif (
            before >= 0
            and candidates[before]
            and frame_time[last] - frame_time[before] < KEY_IMAGE_SPAN_S
        ):
            first = before
        else:
            break
    return list(range(first, last + 1))


def key_frames(
    f: h5py.File, hold: HoldSpan | None, changes: list[tuple[float, str]]
) -> list[KeyFrame]:
    """Up to three HRTEM frames (any frames if no HRTEM frame is known) at the hold's key times."""
    detector = f[layout.DETECTOR]
    frame_time = detector["frame_time"][:]
    n = min(len(frame_time), detector["data"].shape[0])
    if n == 0:
        return []
    frame_time = frame_time[:n]
    candidates = _settled_in(changes, frame_time, "hrtem")
    if not candidates.any():
        candidates = np.ones(n, dtype=bool)
    indices = np.flatnonzero(candidates)
    frames = []
    for label, wanted in _key_frame_times(hold, frame_time):
        index = int(indices[np.argmin(np.abs(frame_time[indices] - wanted))])
        run = _stretch(candidates, frame_time, index)
        try:
            image = sum_rows(detector["data"], run)
        except OSError as exc:  # a compression filter this h5py lacks (hdf5plugin missing)
            log.warning("frame %d unreadable: %s", index, exc)
            continue
        mode = mode_at(changes, frame_time[index])
        pixel_nm = _pixel_nm(detector, index)
        frames.append(
            KeyFrame(label, run[0], float(frame_time[index]), mode, image, len(run), pixel_nm)
        )
    return frames


def _reflection_table(analysis: AnalysisRecord) -> ReflectionTable:
    """The run's tracked reflections (its analysis parameters), else SCIENCE.md's table."""
    records = analysis.parameters.get("reflections")
    if isinstance(records, list) and records:
        try:
            return ReflectionTable.from_records(records)
        except (TypeError, ValueError, KeyError) as exc:
            log.warning("the run's reflection table is unusable (%s): the default is drawn", exc)
    return DEFAULT_REFLECTIONS


def _pixel_nm(detector: h5py.Group, index: int) -> float | None:
    """A frame's specimen-plane pixel (nm), from its `pixel_size` column (runfile/frames.py)."""
    if "pixel_size" not in detector or index >= len(detector["pixel_size"]):
        return None
    metres = float(detector["pixel_size"][index])
    return metres * 1e9 if np.isfinite(metres) and metres > 0 else None


# ----- drawing ---------------------------------------------------------------------------------
def _not_measured(ax: Axes, what: str) -> None:
    ax.text(
        0.5, 0.5, f"{what}: not measured", transform=ax.transAxes,
        ha="center", va="center", color="0.4", fontsize=11,
    )  # fmt: skip


def _mark_run(ax: Axes, hold: HoldSpan | None, bursts: list[tuple[float, float]]) -> None:
    for start, stop in bursts:
        ax.axvspan(start, stop, color="0.85", lw=0, zorder=0)
    if hold is not None:
        ax.axvline(hold.start_s, color="k", ls="--", lw=0.8)
        if hold.end_s is not None:
            ax.axvline(hold.end_s, color="k", ls="--", lw=0.8)


def lm_spans(
    changes: list[tuple[float, str]], start_s: float, end_s: float
) -> list[tuple[float, float]]:
    """The stretches of [start_s, end_s] (the recording) the microscope spent in LM."""
    spans = []
    for i, (time, mode) in enumerate(changes):
        if mode != "lm":
            continue
        stop = changes[i + 1][0] if i + 1 < len(changes) else end_s
        low, high = max(time, start_s), min(stop, end_s)
        if high > low:
            spans.append((low, high))
    return spans


def _plot_series(ax: Axes, series: Series | None, scale: float, **style: Any) -> bool:
    if series is None or not series.measured:
        return False
    ax.plot(series.time, series.value * scale, **style)
    return True


def draw_report_figure(run_file: str | Path, out: str | Path) -> DrawnFigure:
    """Draw the report figure of `run_file` into the PNG `out`."""
    import hdf5plugin  # noqa: F401 - registers bslz4/lz4 so compressed frames can be read
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.gridspec import GridSpec

    run_file, out = Path(run_file), Path(out)
    with open_for_reading(run_file) as f:
        entry = f[layout.ENTRY]
        events = read_events(entry)
        initial = read_text(f, layout.MICROSCOPE_MODE) or None
        changes = imaging_modes(events, initial)
        hold = hold_span(events)
        analysis = read_analysis(entry)
        table = _reflection_table(analysis)
        t = read_column(f, layout.BIAS_VOLTAGE.time)  # (absent: no reading in the run)
        volts = read_column(f, layout.BIAS_VOLTAGE.column("value"))[: len(t)]
        amps = read_column(f, layout.CURRENT.column("value"))[: len(t)]
        temperature = read_temperature(f)
        frame_time = f[layout.DETECTOR]["frame_time"][:]
        frames = key_frames(f, hold, changes)
        title = f"{read_text(f, layout.RUN_ID)}  ({read_text(f, layout.TITLE)})"
    if len(title) > TITLE_LENGTH:
        title = title[: TITLE_LENGTH - 4] + "...)"

    ends = [x[-1] for x in (t, frame_time) if len(x)]
    run_end = float(max(ends)) if ends else 0.0
    first_frame = float(frame_time[0]) if len(frame_time) else 0.0
    bursts = lm_spans(changes, first_frame, run_end)

    rows = panel_rows()
    heated = len(temperature[0]) > 0  # a temperature panel under the bias
    top = 2 if heated else 1
    fig = plt.figure(figsize=FIGURE_SIZE_IN, dpi=DPI)
    grid = GridSpec(top + len(rows), 3, figure=fig, width_ratios=(2.3, 1, 1), hspace=0.35,
                    wspace=0.25, left=0.06, right=0.97, top=0.93, bottom=0.06)  # fmt: skip
    fig.suptitle(title, fontsize=12)
    axes = [fig.add_subplot(grid[0, 0])]
    axes += [fig.add_subplot(grid[i, 0], sharex=axes[0]) for i in range(1, top + len(rows))]
    panels = {"bias": _draw_bias(axes[0], t, volts, amps)}
    if heated:
        panels["temperature"] = _draw_temperature(axes[1], *temperature)
    for ax, quantities in zip(axes[top:], rows, strict=True):
        assert quantities[0].panel is not None
        panels[quantities[0].panel.name] = _draw_panel(ax, analysis, quantities)
    for ax in axes:
        _mark_run(ax, hold, bursts)
        ax.grid(True, alpha=0.3)
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel("run time (s)")
    if hold is not None:
        axes[0].set_title(f"hold ended by: {hold.ended_by}    (grey: LM frames)", fontsize=9)

    right = grid[:, 1:].subgridspec(3, 2, hspace=0.25, wspace=0.08)
    for row in range(3):
        image_ax, fft_ax = fig.add_subplot(right[row, 0]), fig.add_subplot(right[row, 1])
        for ax in (image_ax, fft_ax):
            ax.set_xticks([])
            ax.set_yticks([])
        if row >= len(frames):
            _not_measured(image_ax, "frame")
            continue
        frame = frames[row]
        crop = _centre_crop(frame.image, CROP_PX)  # fringes a few px apart: show them 1:1-ish
        low, high = np.percentile(crop, (1.0, 99.0))
        image_ax.imshow(crop, cmap="gray", vmin=low, vmax=max(high, low + 1))
        mode = f", {frame.mode.upper()}" if frame.mode else ""
        summed = f" (+{frame.frames - 1})" if frame.frames > 1 else ""
        image_ax.set_title(
            f"{frame.label}: frame {frame.index}{summed}, {frame.time_s:.1f} s{mode}", fontsize=9
        )
        if crop.shape != frame.image.shape:
            image_ax.set_xlabel(f"centre {crop.shape[1]} x {crop.shape[0]} px", fontsize=8)
        _draw_spectrum(fft_ax, frame, table)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    plt.close(fig)
    return DrawnFigure(out, panels, frames)


def _draw_spectrum(ax: Axes, frame: KeyFrame, table: ReflectionTable) -> None:
    """The frame's power spectrum over its background (analysis/display.py, as the web view
    shows it), out to just beyond the tracked reflections, with their rings marked."""
    from matplotlib.patches import Circle

    if frame.pixel_nm is None:  # no q scale: the whole transform, as it is
        spectrum, _ = spectrum_image(frame.image, 1.0, math.inf)
        ax.imshow(stretch(spectrum, 1.0, 99.9), cmap="magma")
        ax.set_title("FFT power over background (log)", fontsize=9)
        return
    spectrum, q_max = spectrum_image(frame.image, frame.pixel_nm, spectrum_reach(table))
    half = spectrum.shape[0] / 2
    ax.imshow(stretch(spectrum, 1.0, 99.9), cmap="magma")
    for reflection in table:
        radius = ring_radius_fraction(reflection.d_angstrom, q_max) * half
        if radius < half:
            ring = Circle((half, half), radius, fill=False, lw=0.6, ls=":", color="w", alpha=0.7)
            ax.add_patch(ring)
            ax.text(half + radius * 0.71, half - radius * 0.71, f"{reflection.d_angstrom:g}",
                    color="w", fontsize=6, alpha=0.8)  # fmt: skip
    ax.set_title(f"FFT power over background (log), |q| < {q_max:.1f}/nm; rings: d (A)", fontsize=8)


def _draw_bias(ax: Axes, t: np.ndarray, volts: np.ndarray, amps: np.ndarray) -> bool:
    if not len(t):
        _not_measured(ax, "bias")
        return False
    ax.plot(t, volts, color="tab:blue", lw=1)
    ax.set_ylabel("bias (V)", color="tab:blue")
    current = ax.twinx()
    current.plot(t, amps * 1e9, color="tab:green", lw=0.8)
    current.set_ylabel("current (nA)", color="tab:green")
    return True


def _draw_temperature(ax: Axes, t: np.ndarray, celsius: np.ndarray, setpoint: np.ndarray) -> bool:
    n = min(len(t), len(celsius), len(setpoint))  # SWMR: one column may run ahead
    ax.plot(t[:n], setpoint[:n], color="0.5", lw=0.8, ls="--", label="setpoint")
    ax.plot(t[:n], celsius[:n], color="tab:red", lw=1, label="chip")
    ax.set_ylabel("temperature (C)", color="tab:red")
    ax.legend(fontsize=7, loc="upper left")
    return True


def panel_rows() -> list[list[Quantity]]:
    """The analysis panels below the bias, top to bottom: the declared quantities drawn in
    each (analysis/quantities.py `panel`), the first of a row giving the panel its labels."""
    by_row: dict[int, list[Quantity]] = {}
    for quantity in registered():
        if quantity.panel is not None:
            by_row.setdefault(quantity.panel.row, []).append(quantity)
    return [by_row[row] for row in sorted(by_row)]


def _draw_panel(ax: Axes, analysis: AnalysisRecord, quantities: list[Quantity]) -> bool:
    panel = quantities[0].panel
    assert panel is not None
    drawn = False
    for quantity in quantities:
        if quantity.per == "reflection":
            drawn |= _draw_reflections(ax, analysis)
        elif quantity.per == "phase":
            drawn |= _draw_phases(ax, analysis, quantity)
        elif quantity.panel is not None and quantity.panel.note is not None:
            _write_latest(ax, analysis.series.get(quantity.key), quantity.panel.note, drawn)
        else:
            series = analysis.series.get(quantity.key)
            style = {"color": panel.colour, "marker": ".", "lw": 0.8}
            drawn |= _plot_series(ax, series, panel.scale, **style)
    if not drawn:
        _not_measured(ax, panel.empty)
    ax.set_ylabel(panel.ylabel)
    return drawn


def _write_latest(ax: Axes, series: Series | None, note: str, drawn: bool) -> None:
    """A quantity's latest value as text on a panel that shows a line (e.g. the front's speed
    on the front's position)."""
    latest = series.last() if series is not None else None
    if drawn and latest is not None and math.isfinite(latest):
        ax.text(0.01, 0.9, note.format(latest), transform=ax.transAxes, fontsize=8, va="top")


def _draw_reflections(ax: Axes, analysis: AnalysisRecord) -> bool:
    """Each tracked reflection's intensity, labelled with its table entry."""
    drawn = False
    for reflection in analysis.reflections.values():
        if not np.any(np.isfinite(reflection.intensity)):
            continue
        ax.plot(reflection.time, reflection.intensity, ".-", ms=2, lw=0.8, label=reflection.title)
        drawn = True
    if drawn:
        ax.legend(fontsize=7, ncol=3, loc="upper left")
    return drawn


def _draw_phases(ax: Axes, analysis: AnalysisRecord, quantity: Quantity) -> bool:
    drawn = False
    for phase, series in analysis.members(quantity).items():
        colour = PHASE_COLOURS.get(phase)
        drawn |= _plot_series(ax, series, 1.0, color=colour, label=phase.replace("_", " "), lw=1)
    # Where rock salt is seen at all (first in tiles it does not yet win): the onset, earlier.
    seen = analysis.phase_presence.get("rock_salt")
    if drawn and seen is not None:
        _plot_series(ax, seen, 1.0, color=PHASE_COLOURS.get("rock_salt"), ls=":", lw=1,
                     label="rock salt seen")  # fmt: skip
    if drawn:
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7, loc="center left")
    return drawn
