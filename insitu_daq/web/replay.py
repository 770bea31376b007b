"""Run files read back for the web view (docs/WEB.md): the runs page's list, a run as one state
object (`"mode": "replay"`), and a replayed preview at a run time. Reading only, no HTTP:
web/server.py serves these.

Why it reads as it does:
- Every reader is report/'s (summary, analysis, events, frames), so the page and
  `insitu-daq report` say the same about a run.
- Files are opened read-only, as SWMR readers while a writer has them (runfile/h5util.py
  `open_for_reading`), so a run still being written is listed and replayed as far as it got.
  Each call opens the file anew: a writer that changed the file's layout (a new frame
  geometry) is seen at the next call.
- The list caches each file's summary by (path, mtime, size). The runs page is reloaded often,
  and a finished run file never changes, so it is read once; a growing one is read again
  whenever it grew.
- Everything returned is JSON-safe: NaN and infinities become None. Starlette's JSONResponse
  refuses NaN, and a page cannot plot it anyway.
- A run name is a file name without its suffix, checked (`resolve_run`) so that a URL cannot
  reach outside data_dir.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime, timezone
from os import stat_result
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from insitu_daq.analysis import display
from insitu_daq.analysis.quantities import (
    D_SPACING,
    INTENSITY,
    Quantity,
    members,
    registered,
)
from insitu_daq.analysis.reflections import ReflectionTable
from insitu_daq.report.analysis import AnalysisRecord, Series, read_analysis
from insitu_daq.report.events import imaging_modes, outcome, read_events
from insitu_daq.report.frames import FrameIndex, frame_stacks, read_frame_index, sum_rows
from insitu_daq.report.summary import RunSummary, summarize
from insitu_daq.runfile import layout
from insitu_daq.runfile.h5util import open_for_reading, read_column, read_text
from insitu_daq.web.images import MAX_SIDE, encode_jpeg, smoothing_of

log = logging.getLogger(__name__)

RUN_SUFFIX = ".h5"
FIGURE_SUFFIX = ".png"  # `insitu-daq report RUN.h5` draws RUN.png
ERROR_LENGTH = 200  # characters of a listed file's one-line error
MAX_SERIES_POINTS = 20_000  # the page keeps at most this many points a series (docs/WEB.md)
PREVIEW_MAX_SIDE = MAX_SIDE  # px a side of a preview unless full resolution is asked for
IMAGE_KINDS = ("hrtem", "lm")
PREVIEW_KINDS = (*IMAGE_KINDS, "fft")
# An LM preview is the dose sum of the frames within this many run s of the nearest one, as
# the live view shows the analysis's LM sums: one low-dose LM frame is mostly shot noise.
LM_SUM_S = 0.25
# The spectrum sums the HRTEM frames within FFT_SUM_S, at most FFT_MAX_FRAMES (a second at
# 40 fps): the lattice spots of a single low-dose frame are lost in its noise.
FFT_SUM_S = 0.5
FFT_MAX_FRAMES = 40
# Per preview kind: (run s around the nearest frame, most frames) summed into it.
_SUMMED: dict[str, tuple[float, int | None]] = {
    "hrtem": (0.0, 1),
    "lm": (LM_SUM_S, None),
    "fft": (FFT_SUM_S, FFT_MAX_FRAMES),
}
D_SPACING_A = "d_spacing_a.{}"  # the page's key of a reflection's measured d in Å
D_SPACINGS_PANEL = "d_spacings"


# ----- JSON-safe values --------------------------------------------------------------------
def _nullable(values: np.ndarray) -> list[float | None]:
    """A float column as a JSON list, NaN and infinities as None."""
    array = np.asarray(values, dtype=float)
    finite = np.isfinite(array)
    listed: list[float | None] = array.tolist()
    if finite.all():
        return listed
    return [value if ok else None for value, ok in zip(listed, finite.tolist(), strict=True)]


def _json_safe(value: Any) -> Any:
    """`value` with numpy scalars as Python ones and non-finite floats as None (small
    structures only: summaries, metadata)."""
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----- the runs page -----------------------------------------------------------------------
_CacheKey = tuple[int, int]  # (st_mtime_ns, st_size)
_summaries: dict[Path, tuple[_CacheKey, dict[str, Any]]] = {}
_summaries_lock = threading.Lock()  # list_runs may run in several server threads at once


def list_runs(data_dir: Path) -> list[dict[str, Any]]:
    """The run files directly in `data_dir` (*.h5, not hidden), newest first (by mtime): name,
    file, size_bytes, modified (ISO 8601, UTC), figure (RUN.png exists) and either `summary`
    or, for a file that cannot be read as a run file, `error` (one line)."""
    listed: list[tuple[int, dict[str, Any]]] = []
    skipped = 0
    seen: set[Path] = set()
    for path in sorted(data_dir.glob(f"*{RUN_SUFFIX}")):
        try:
            stat = path.stat()
        except OSError:  # gone between the listing and now
            skipped += 1
            continue
        if path.name.startswith(".") or not path.is_file():
            skipped += 1
            continue
        seen.add(path)
        listed.append((stat.st_mtime_ns, _listed(path, stat)))
    _forget_others(data_dir, seen)
    if skipped:
        log.debug("%s: %d entries skipped (hidden, not a file, or gone)", data_dir, skipped)
    listed.sort(key=lambda item: (item[0], item[1]["name"]), reverse=True)
    return [entry for _, entry in listed]


def _listed(path: Path, stat: stat_result) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": path.name.removesuffix(RUN_SUFFIX),
        "file": path.name,
        "size_bytes": stat.st_size,
        "modified": datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc).isoformat(
            timespec="seconds"
        ),
        "figure": path.with_suffix(FIGURE_SUFFIX).is_file(),
    }
    entry.update(_cached_summary(path, (stat.st_mtime_ns, stat.st_size)))
    return entry


def _cached_summary(path: Path, key: _CacheKey) -> dict[str, Any]:
    """{"summary": ...} or {"error": ...} of `path`, read only if it changed since last time."""
    with _summaries_lock:
        cached = _summaries.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        found: dict[str, Any] = {"summary": summary_of(summarize(path))}
    except Exception as exc:  # whatever makes a file unreadable: listed, not fatal
        found = {"error": _one_line(exc)}
        log.warning("%s is not a readable run file: %s", path, found["error"])
    with _summaries_lock:
        _summaries[path] = (key, found)
    return found


def _forget_others(data_dir: Path, seen: set[Path]) -> None:
    """Drop the cached summaries of `data_dir`'s files that are gone (deleted, renamed)."""
    with _summaries_lock:
        for path in [p for p in _summaries if p.parent == data_dir and p not in seen]:
            del _summaries[path]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, KeyError):  # h5py's: an object a run file has is missing
        text = f"not a run file: {text}"
    return text[:ERROR_LENGTH]


def summary_of(summary: RunSummary) -> dict[str, Any]:
    """The runs page's summary of a run (JSON-safe)."""
    return _json_safe(
        {
            "run_id": summary.run_id,
            "title": summary.title,
            "protocol": summary.protocol_name,
            "start_time": summary.start_time,
            "end_time": summary.end_time or None,  # "": not closed (still written, or lost)
            "duration_s": summary.last_time_s,
            "frames": summary.frames + sum(n for _, n, _ in summary.other_geometries),
            "frame_rate_hz": summary.frame_rate_hz,
            "missing_image_ids": summary.missing_image_ids,
            "bias_samples": summary.bias_samples,
            "charge_coulomb": summary.charge_coulomb,
            "holds": [asdict(hold) for hold in summary.holds],
            "outcome": outcome(summary.events),
            "imaging_frames": summary.imaging_frames,
        }
    )


def resolve_run(data_dir: Path, name: str) -> Path:
    """The run file called `name` (its file name without ".h5") in `data_dir`. ValueError for
    a name that could leave data_dir (a path separator, "..", a leading dot) or no such file."""
    separators = {"/", "\\", "\0"}
    if not name or name.startswith(".") or ".." in name or separators & set(name):
        raise ValueError(f"not a run name: {name!r}")
    path = data_dir / f"{name}{RUN_SUFFIX}"
    if path.parent != data_dir or not path.is_file():
        raise ValueError(f"no run {name!r}")
    return path


# ----- a run as a state object -------------------------------------------------------------
def replay_state(path: Path) -> dict[str, Any]:
    """The run in `path` as one state object shaped like docs/WEB.md's, `"mode": "replay"`:
    every series, every event, the frame times of each imaging mode, and of the previews only
    where the spectrum's rings fall (the page asks `preview_at` for the frame at the time it
    shows)."""
    with open_for_reading(path) as f:
        entry = f[layout.ENTRY]
        events = read_events(entry)
        analysis = read_analysis(entry)
        index = _frame_index(f, events)
        bias = _bias_series(f)
        instruments = instrument_series(f)
        run_id = read_text(f, layout.RUN_ID)
        title = read_text(f, layout.TITLE)
        protocol = read_text(f, layout.PROTOCOL_FILE_NAME)
        reflections = reflection_table(analysis)
        fft = _spectrum_rings(f, index, reflections)
    quantities = quantity_entries(reflections)
    ends = [x[-1] for x in (bias["t"], index.time) if len(x)]
    ends += [max(time for time, _, _ in events)] if events else []
    return {
        "type": "snapshot",
        "mode": "replay",
        "quantities": quantities,
        "reflections": reflections,
        "status": _json_safe(
            {
                "run_id": run_id,
                "title": title,
                "protocol": {"protocol": protocol, "state": outcome(events)},
            }
        ),
        "series": {
            "bias": {key: _nullable(values) for key, values in bias.items()},
            "analysis": analysis_series(analysis, [q["key"] for q in quantities]),
            **instruments,
        },
        "events": [
            {"time": time, "kind": kind, "message": message} for time, kind, message in events
        ],
        "frame_times": {mode: _frame_times(index, mode) for mode in IMAGE_KINDS},
        "duration_s": float(max(ends, default=0.0)),
        "previews": {"fft": fft} if fft else {},
    }


def _spectrum_rings(
    f: h5py.File, index: FrameIndex, reflections: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Where the tracked rings fall on the run's replayed spectra (their q reach, from the
    first HRTEM frame of known pixel size), for the page to draw before it asks for one. None
    without such a frame."""
    known = (index.mode == "hrtem") & np.isfinite(index.pixel_m)
    if not known.any():
        return None
    first = int(np.argmax(known))
    shape = frame_stacks(f)[int(index.stack[first])]["data"].shape[1:]
    pixel_nm = float(index.pixel_m[first]) * 1e9
    q_max = display.spectrum_extent(shape, pixel_nm, _reach(reflections), PREVIEW_MAX_SIDE)
    return {"q_max_per_nm": q_max, "rings": _rings(reflections, q_max)}


def _reach(reflections: list[dict[str, Any]]) -> float:
    spacings = [float(r["d_angstrom"]) for r in reflections if r.get("d_angstrom")]
    return display.RING_MARGIN * 10.0 / min(spacings) if spacings else math.inf


def _rings(reflections: list[dict[str, Any]], q_max: float) -> list[dict[str, Any]]:
    return [
        {
            "name": r["name"],
            "label": r["label"],
            "d_angstrom": r["d_angstrom"],
            "radius_fraction": display.ring_radius_fraction(float(r["d_angstrom"]), q_max),
        }
        for r in reflections
        if r.get("d_angstrom")
    ]


def _frame_index(f: h5py.File, events: list[tuple[float, str, str]]) -> FrameIndex:
    start_mode = read_text(f, layout.MICROSCOPE_MODE) or None
    return read_frame_index(f, imaging_modes(events, start_mode), start_mode)


def _frame_times(index: FrameIndex, mode: str) -> list[float]:
    return np.sort(index.time[index.of_mode(mode)]).tolist()


def thinned(n: int, limit: int = MAX_SERIES_POINTS) -> np.ndarray:
    """Indices of at most `limit` of n points: every k-th (a plain stride, so a spike between
    kept points can be missed) and the last, so the series still ends where the run did."""
    if n <= limit:
        return np.arange(n)
    step = math.ceil(n / (limit - 1))
    kept = np.arange(0, n, step)
    return kept if kept[-1] == n - 1 else np.append(kept, n - 1)


def _bias_series(f: h5py.File) -> dict[str, np.ndarray]:
    """t, voltage, setpoint, current of the bias log (thinned to MAX_SERIES_POINTS)."""
    t = read_column(f, layout.BIAS_VOLTAGE.time)
    volts = read_column(f, layout.BIAS_VOLTAGE.column("value"))
    setpoint = read_column(f, layout.BIAS_VOLTAGE.column("setpoint"))
    amps = read_column(f, layout.CURRENT.column("value"))
    n = min(len(t), len(volts), len(setpoint))  # SWMR: one column may run ahead
    current = np.full(n, np.nan)
    current[: min(n, len(amps))] = amps[:n]
    kept = thinned(n)
    columns = {"t": t, "voltage": volts, "setpoint": setpoint, "current": current}
    return {key: np.asarray(values[:n], dtype=float)[kept] for key, values in columns.items()}


def instrument_series(f: h5py.File) -> dict[str, dict[str, list[float | None]]]:
    """Each instrument series the file logged (runfile/layout.py SERIES: a heating holder's
    temperature...), by series name, as the live state keeps it from the event stream: `t`
    and the log's columns (thinned to MAX_SERIES_POINTS). A log with no rows is left out."""
    series = {}
    for name, log in layout.SERIES.items():
        t = read_column(f, log.time)
        if not len(t):
            continue
        columns = {column.name: read_column(f, log.column(column.name)) for column in log.columns}
        n = min(len(t), *(len(values) for values in columns.values()))  # SWMR: one may lead
        kept = thinned(n)
        series[name] = {
            key: _nullable(np.asarray(values[:n], dtype=float)[kept])
            for key, values in {"t": t, **columns}.items()
        }
    return series


def reflection_table(analysis: AnalysisRecord) -> list[dict[str, Any]]:
    """The run's tracked reflections (name, label, d_angstrom, phase): its analysis
    parameters' table, then any reflection with a log that the table lacks."""
    records = analysis.parameters.get("reflections", [])
    try:
        table = ReflectionTable.from_records(records if isinstance(records, list) else [])
    except (ValueError, TypeError, AttributeError) as exc:
        log.warning("the run's reflection table is unreadable (%s): only logged ones", exc)
        table = ReflectionTable(())
    entries = [
        {"name": r.name, "label": r.label, "d_angstrom": r.d_angstrom, "phase": r.phase}
        for r in table
    ]
    for name, logged in analysis.reflections.items():
        if name not in table.names:
            entries.append(
                {
                    "name": name,
                    "label": logged.label,
                    "d_angstrom": logged.d_angstrom,
                    "phase": logged.phase,
                }
            )
    return entries


def quantity_entries(reflections: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The page's plotted quantities: each declared quantity with a report panel
    (analysis/quantities.py), one entry per member of a family, then each reflection's d in Å
    (panel "d_spacings"). A quantity shown as a panel's note (the front's speed) says so."""
    labels = {r["name"]: str(r["label"]) for r in reflections}
    entries = []
    for quantity in registered():
        panel = quantity.panel
        if panel is None:
            continue
        for member in members(quantity, list(labels)):
            entry = {
                "key": quantity.key_for(member),
                "panel": panel.name,
                "label": _label(quantity, member, labels),
                "unit": _unit(quantity),
                "scale": panel.scale,
                "ylabel": panel.ylabel.replace("\n", " "),
            }
            if panel.note is not None:
                entry["note"] = panel.note
            entries.append(entry)
    for name, label in labels.items():
        entries.append(
            {
                "key": D_SPACING_A.format(name),
                "panel": D_SPACINGS_PANEL,
                "label": label,
                "unit": "Å",
                "scale": 1.0,
                "ylabel": "d (Å)",
            }
        )
    return entries


def _label(quantity: Quantity, member: str, reflections: dict[str, str]) -> str:
    if quantity.per == "reflection":
        return reflections.get(member, member)
    name = member.replace("_", " ")
    if quantity.text is not None:
        return quantity.text.label.format(name) if quantity.per else quantity.text.label
    return name or quantity.key


def _unit(quantity: Quantity) -> str:
    """The unit of the shown value (times the panel's scale): the report line's when it
    scales alike (expansion: %), else the run file's ("1": dimensionless, no unit)."""
    text, panel = quantity.text, quantity.panel
    if text is not None and panel is not None and text.scale == panel.scale:
        return text.unit.strip()
    return "" if quantity.unit in (None, "1") else str(quantity.unit)


def _analysis_columns(analysis: AnalysisRecord) -> dict[str, Series]:
    """Every analysis log by its result key, and each reflection's d in Å."""
    columns = dict(analysis.series)
    for name, reflection in analysis.reflections.items():
        columns[D_SPACING.key_for(name)] = Series(reflection.time, reflection.d_m)
        columns[INTENSITY.key_for(name)] = Series(reflection.time, reflection.intensity)
        columns[D_SPACING_A.format(name)] = Series(reflection.time, reflection.d_m * 1e10)
    return columns


def analysis_series(analysis: AnalysisRecord, keys: Iterable[str]) -> dict[str, list[Any]]:
    """The analysis logs on one time axis, the union of their times ("t"), each key None where
    its log has no row (an LM quantity at an HRTEM result's time) or a NaN (not measurable);
    `keys` (the plotted ones) are there even when the file has no log of them."""
    columns = _analysis_columns(analysis)
    times = np.unique(np.concatenate([np.zeros(0), *(c.time for c in columns.values())]))
    merged: dict[str, list[Any]] = {"t": times.tolist()}
    for key, column in columns.items():
        values = np.full(len(times), np.nan)
        values[np.searchsorted(times, column.time)] = column.value
        merged[key] = _nullable(values)
    for key in keys:
        merged.setdefault(key, [None] * len(times))
    return merged


# ----- replayed previews -------------------------------------------------------------------
def preview_at(
    path: Path, kind: str, time_s: float, full: bool = False
) -> tuple[bytes, dict[str, Any]]:
    """(JPEG, meta) of the run's `kind` preview at run time `time_s`: "hrtem" the HRTEM frame
    nearest to it; "lm" the dose sum of the LM frames within LM_SUM_S of the nearest one;
    "fft" the power spectrum of the HRTEM frames within FFT_SUM_S of the nearest one. Images
    at most PREVIEW_MAX_SIDE a side unless `full`. KeyError if the run has no frame of that
    mode, ValueError for an unknown kind or a time that is not a number."""
    if kind not in PREVIEW_KINDS:
        raise ValueError(f"preview kind {kind!r} is not one of {PREVIEW_KINDS}")
    if not math.isfinite(time_s):
        raise ValueError(f"preview time {time_s!r} is not a number")
    import hdf5plugin  # noqa: F401 - registers bslz4/lz4 so compressed frames can be read

    mode = "lm" if kind == "lm" else "hrtem"
    with open_for_reading(path) as f:
        index = _frame_index(f, read_events(f[layout.ENTRY]))
        chosen = _frames_for(index, mode, kind, time_s, path.name)
        nearest = chosen[0]
        data = frame_stacks(f)[int(index.stack[nearest])]["data"]
        image = sum_rows(data, index.row[chosen].tolist())
        reflections = reflection_table(read_analysis(f[layout.ENTRY])) if kind == "fft" else []
    pixel_m = float(index.pixel_m[nearest])
    meta: dict[str, Any] = {
        "time": float(index.time[nearest]),
        "image_id": int(index.image_id[nearest]),
        "shape": list(image.shape),
        "pixel_nm": pixel_m * 1e9 if math.isfinite(pixel_m) else None,
        "integrated_frames": len(chosen),
    }
    if kind == "fft":
        shown, extra = _spectrum(image, meta["pixel_nm"], reflections, full)
    else:
        shown, extra = _picture(image, meta["pixel_nm"], full, smoothing_of(kind))
    meta.update(extra, shown_shape=list(shown.shape), media_type="image/jpeg")
    return encode_jpeg(shown), _json_safe(meta)


def _frames_for(index: FrameIndex, mode: str, kind: str, time_s: float, run: str) -> np.ndarray:
    """The frames a preview shows, the one nearest `time_s` first: for a sum, its neighbours
    of the same mode, frame geometry and pixel size within the kind's window."""
    candidates = index.of_mode(mode)
    if not len(candidates):
        raise KeyError(f"{run} has no {mode} frame")
    nearest = int(candidates[np.argmin(np.abs(index.time[candidates] - time_s))])
    window, limit = _SUMMED[kind]
    pixel = index.pixel_m[nearest]
    same_pixel = (index.pixel_m[candidates] == pixel) | (
        np.isnan(index.pixel_m[candidates]) & np.isnan(pixel)
    )
    near = np.abs(index.time[candidates] - index.time[nearest]) <= window
    alike = candidates[(index.stack[candidates] == index.stack[nearest]) & same_pixel & near]
    others = alike[alike != nearest]
    others = others[np.argsort(np.abs(index.time[others] - index.time[nearest]), kind="stable")]
    chosen = np.r_[nearest, others].astype(np.int64)
    return chosen[:limit] if limit is not None else chosen


def _picture(
    image: np.ndarray, pixel_nm: float | None, full: bool, smoothing_px: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """The image as shown (display.shown_frame: downsampled unless `full`, smoothed as the live
    preview of its mode, stretched) and its scale bar (None without a pixel size)."""
    shown = display.shown_frame(
        image, None if full else PREVIEW_MAX_SIDE, 0.0 if full else smoothing_px
    )
    bar = None
    if pixel_nm is not None:
        length_nm, fraction = display.scale_bar(pixel_nm, image.shape[1])
        bar = {"length_nm": length_nm, "fraction": fraction}
    return shown, {"scale_bar": bar}


def _spectrum(
    image: np.ndarray, pixel_nm: float | None, reflections: list[dict[str, Any]], full: bool
) -> tuple[np.ndarray, dict[str, Any]]:
    """The power spectrum (analysis/display.py spectrum_image) up to display.RING_MARGIN x the
    table's largest 1/d, with each reflection's ring. Without a pixel size it spans the whole
    transform (to Nyquist, in units of the frame's pixels) and has no rings: where they fall is
    not known."""
    side = max(image.shape) if full else PREVIEW_MAX_SIDE
    if pixel_nm is None:
        spectrum, _ = display.spectrum_image(image, 1.0, display.nyquist_per_nm(1.0), side)
        return display.stretch(spectrum), {"scale_bar": None, "q_max_per_nm": None, "rings": []}
    spectrum, q_max = display.spectrum_image(image, pixel_nm, _reach(reflections), side)
    rings = _rings(reflections, q_max)
    return display.stretch(spectrum), {"scale_bar": None, "q_max_per_nm": q_max, "rings": rings}
