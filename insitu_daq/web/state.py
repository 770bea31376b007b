"""The live state the page shows, and each viewer's pending update (docs/WEB.md).

Feed threads (web/feeds.py) call the `on_*` methods. A viewer's WebSocket task takes its pending
update when it is ready to send. Updates that arrive while a viewer's socket is busy are merged
into one: status and previews are replaced, series points and events are added. So a slow
viewer gets fewer, larger messages and never a queue. Its pending series points are bounded by
MAX_POINTS like the state's own.

Times. The page's axis is run time (s since the run's start, as in the run file). Analysis
results and instruments' series (a heating holder's temperature: the stream's `series` topic,
each declared by its run-file log in runfile/layout.py) come with run time. The event stream's
bias samples and events come on the daemon clock, which the status's `run_offset_s` converts.
Samples and events that arrive before the status that names a new run are held (up to
PREAMBLE_MESSAGES) and placed once it does.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from insitu_daq.analysis.quantities import D_SPACING, members, registered
from insitu_daq.analysis.reflections import ReflectionTable
from insitu_daq.runfile import layout

MAX_POINTS = 20_000  # points kept per series; older ones are thinned by half beyond it
MAX_EVENTS = 5_000
PREAMBLE_MESSAGES = 5_000
D_SPACING_A = "d_spacing_a.{}"  # the page shows d in Å; the results carry metres


def quantity_panels(table: ReflectionTable) -> list[dict[str, Any]]:
    """The page's analysis plot lines, from the quantities' declared report panels
    (analysis/quantities.py), one per family member, plus the d-spacings in Å."""
    labels = {reflection.name: reflection.label for reflection in table}
    lines: list[dict[str, Any]] = []
    for quantity in registered():
        panel = quantity.panel
        if panel is None or panel.note is not None:
            continue
        for member in members(quantity, table.names):
            lines.append(
                {
                    "key": quantity.key_for(member),
                    "panel": panel.name,
                    "label": labels.get(member, member.replace("_", " ")) or panel.empty,
                    "unit": quantity.unit or "",
                    "scale": panel.scale,
                    "ylabel": panel.ylabel.replace("\n", " "),
                }
            )
    for member in table.names:
        lines.append(
            {
                "key": D_SPACING_A.format(member),
                "panel": "d_spacings",
                "label": labels[member],
                "unit": "Å",
                "scale": 1.0,
                "ylabel": "d-spacing (Å)",
            }
        )
    for quantity in registered():  # lines written as notes (the front's speed)
        if quantity.panel is not None and quantity.panel.note is not None:
            lines.append(
                {
                    "key": quantity.key,
                    "panel": quantity.panel.name,
                    "label": quantity.text.label if quantity.text else quantity.key,
                    "unit": quantity.unit or "",
                    "scale": quantity.panel.scale,
                    "ylabel": quantity.unit or "",
                    "axis": "right",
                }
            )
    return lines


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class SeriesBuffer:
    """Columns of one series, `t` first. A column that appears later is filled with None
    before it; beyond `limit` points the older half is thinned to every other point, so a
    long run keeps its whole span at a coarser step."""

    def __init__(self, limit: int = MAX_POINTS) -> None:
        self.limit = limit
        self.columns: dict[str, list[float | None]] = {"t": []}

    def __len__(self) -> int:
        return len(self.columns["t"])

    def extend(self, rows: Iterable[dict[str, float | None]]) -> None:
        for row in rows:
            n = len(self)
            for key in row:
                if key not in self.columns:
                    self.columns[key] = [None] * n
            for key, column in self.columns.items():
                column.append(row.get(key))
        while len(self) > self.limit:
            half = len(self) // 2
            for key, column in self.columns.items():
                self.columns[key] = column[:half:2] + column[half:]

    def to_json(self) -> dict[str, list[float | None]]:
        return {key: list(column) for key, column in self.columns.items()}


@dataclass
class Preview:
    meta: dict[str, Any]
    data: bytes  # the encoded image
    media_type: str
    source: Any = None  # the frame sum (float32 array), for the full-resolution image
    full: bytes | None = None


@dataclass(eq=False)  # a viewer is itself, whatever it holds: hashable by identity
class Viewer:
    """One connected page: what it has not been sent yet."""

    loop: asyncio.AbstractEventLoop
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    snapshot_due: bool = True
    status: dict[str, Any] | None = None
    bias: SeriesBuffer = field(default_factory=SeriesBuffer)
    analysis: SeriesBuffer = field(default_factory=SeriesBuffer)
    instruments: dict[str, SeriesBuffer] = field(default_factory=dict)  # by series name
    events: list[dict[str, Any]] = field(default_factory=list)
    previews: dict[str, dict[str, Any]] = field(default_factory=dict)
    merged: int = 0  # changes merged into a pending update (a busy socket)

    def clear(self) -> None:
        self.status = None
        self.bias, self.analysis = SeriesBuffer(), SeriesBuffer()
        self.instruments = {}
        self.events, self.previews = [], {}

    def poke(self) -> None:
        self.merged += 1
        self.loop.call_soon_threadsafe(self.wake.set)


class LiveState:
    """What the page shows (module docstring); thread-safe."""

    def __init__(self, table: ReflectionTable, station: str) -> None:
        self.table = table
        self.station = station
        self._lock = threading.Lock()
        self._viewers: set[Viewer] = set()
        self._quantities = quantity_panels(table)
        self._preamble: collections.deque[tuple[str, dict[str, Any]]] = collections.deque(
            maxlen=PREAMBLE_MESSAGES
        )
        self.previews: dict[str, Preview] = {}
        self._versions: collections.Counter[str] = collections.Counter()
        self.counters = collections.Counter[str]()
        self._reset(None, None)

    # ----- viewers ---------------------------------------------------------------------------
    def add_viewer(self, loop: asyncio.AbstractEventLoop) -> Viewer:
        viewer = Viewer(loop)
        with self._lock:
            self._viewers.add(viewer)
        viewer.poke()
        return viewer

    def remove_viewer(self, viewer: Viewer) -> None:
        with self._lock:
            self._viewers.discard(viewer)

    @property
    def viewers(self) -> int:
        with self._lock:
            return len(self._viewers)

    def take(self, viewer: Viewer) -> dict[str, Any] | None:
        """The viewer's pending update (a snapshot when due), or None if nothing changed."""
        with self._lock:
            if viewer.snapshot_due:
                viewer.snapshot_due = False
                viewer.clear()
                return self._snapshot()
            update: dict[str, Any] = {"type": "update"}
            if viewer.status is not None:
                update["status"] = viewer.status
            append = {}
            if len(viewer.bias):
                append["bias"] = viewer.bias.to_json()
            if len(viewer.analysis):
                append["analysis"] = viewer.analysis.to_json()
            for name, buffer in viewer.instruments.items():
                append[name] = buffer.to_json()
            if append:
                update["append"] = append
            if viewer.events:
                update["events"] = viewer.events
            if viewer.previews:
                update["previews"] = viewer.previews
            viewer.clear()
            return update if len(update) > 1 else None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        return {
            "type": "snapshot",
            "mode": "live",
            "station": self.station,
            "quantities": self._quantities,
            "reflections": self.table.to_records(),
            "status": self._status,
            "series": {
                "bias": self._bias.to_json(),
                "analysis": self._analysis.to_json(),
                **{name: buffer.to_json() for name, buffer in self._instruments.items()},
            },
            "events": list(self._events),
            "previews": {kind: preview.meta for kind, preview in self.previews.items()},
        }

    # ----- inputs ----------------------------------------------------------------------------
    def on_status(self, status: dict[str, Any]) -> None:
        with self._lock:
            run_id, offset = status.get("run_id"), _number(status.get("run_offset_s"))
            if run_id is not None and run_id != self._run_id:
                self._reset(run_id, offset)
                for topic, payload in self._preamble:
                    self._place(topic, payload)
                self._preamble.clear()
            self._status = status
            for viewer in self._viewers:
                viewer.status = status
                viewer.poke()

    def on_bias(self, payload: dict[str, Any]) -> None:
        with self._lock:
            self._place("bias", payload)

    def on_event(self, payload: dict[str, Any]) -> None:
        with self._lock:
            self._place("event", payload)

    def on_analysis(self, payload: dict[str, Any]) -> None:
        time_s = _number(payload.get("time"))
        values = payload.get("values")
        if time_s is None or not isinstance(values, dict):
            self.counters["analysis_malformed"] += 1
            return
        row: dict[str, float | None] = {"t": time_s}
        for key, value in values.items():
            row[str(key)] = _number(value)
            member = D_SPACING.member_of(str(key))
            if member:
                metres = _number(value)
                row[D_SPACING_A.format(member)] = None if metres is None else metres * 1e10
        with self._lock:
            self._analysis.extend([row])
            if payload.get("mode") == "hrtem":
                self._latest_hrtem = row
            for viewer in self._viewers:
                viewer.analysis.extend([row])
                viewer.poke()

    def on_series(self, payload: dict[str, Any]) -> None:
        """An instrument's readings (`series` topic: `{"name", "t": [...], <column>: [...]}`,
        run time), kept as a series of that name with its log's columns (runfile/layout.py)."""
        name = str(payload.get("name"))
        log = layout.SERIES.get(name)
        times = payload.get("t")
        if log is None or not isinstance(times, list):
            self.counters["series_malformed"] += 1
            return
        columns = {column.name: payload.get(column.name) for column in log.columns}
        rows: list[dict[str, float | None]] = []
        for i, time_s in enumerate(times):
            row = {"t": _number(time_s)}
            for column, values in columns.items():
                value = values[i] if isinstance(values, list) and i < len(values) else None
                row[column] = _number(value)
            if row["t"] is not None:
                rows.append(row)
        if not rows:
            return
        with self._lock:
            self._instruments.setdefault(name, SeriesBuffer()).extend(rows)
            for viewer in self._viewers:
                viewer.instruments.setdefault(name, SeriesBuffer()).extend(rows)
                viewer.poke()

    def set_preview(
        self,
        kind: str,
        meta: dict[str, Any],
        data: bytes,
        source: Any = None,
        media_type: str = "image/jpeg",
    ) -> None:
        with self._lock:
            self._versions[kind] += 1
            version = self._versions[kind]
            meta = {**meta, "version": version, "url": f"/api/preview/{kind}?v={version}"}
            if kind == "fft":
                meta["rings"] = [self._ring_seen(ring) for ring in meta.get("rings", [])]
            self.previews[kind] = Preview(meta, data, media_type, source)
            for viewer in self._viewers:
                viewer.previews[kind] = meta
                viewer.poke()

    def preview_image(self, kind: str, full: bool = False) -> tuple[bytes, str] | None:
        """(the encoded preview, its media type); `full`: the frame at its own size."""
        from insitu_daq.web.images import frame_jpeg  # Pillow only where images are made

        with self._lock:
            preview = self.previews.get(kind)
        if preview is None:
            return None
        if not full or preview.source is None:
            return preview.data, preview.media_type
        if preview.full is None:
            preview.full, _ = frame_jpeg(preview.source, full=True, smoothing_px=0.0)
        return preview.full, "image/jpeg"

    # ----- under the lock --------------------------------------------------------------------
    def _reset(self, run_id: str | None, offset_s: float | None) -> None:
        self._run_id, self._offset_s = run_id, offset_s
        self._status: dict[str, Any] | None = None
        self._bias, self._analysis = SeriesBuffer(), SeriesBuffer()
        self._instruments: dict[str, SeriesBuffer] = {}
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_EVENTS)
        self._latest_hrtem: dict[str, float | None] = {}
        self.previews = {}
        for viewer in self._viewers:
            viewer.snapshot_due = True
            viewer.poke()

    def _place(self, topic: str, payload: dict[str, Any]) -> None:
        """A bias sample or event on the run's time axis (or held until a run names it)."""
        time_s = _number(payload.get("time"))
        if time_s is None:
            self.counters[f"{topic}_malformed"] += 1
            return
        if self._offset_s is None:
            self._preamble.append((topic, payload))
            return
        run_time = time_s - self._offset_s
        if run_time < -1.0:  # before this run (held while the previous one ended)
            return
        if topic == "bias":
            row = {
                "t": run_time,
                "voltage": _number(payload.get("voltage")),
                "setpoint": _number(payload.get("setpoint")),
                "current": _number(payload.get("current")),
            }
            self._bias.extend([row])
            for viewer in self._viewers:
                viewer.bias.extend([row])
                viewer.poke()
            return
        data = payload.get("data") if isinstance(payload.get("data"), dict) else {}
        event = {
            "time": run_time,
            "kind": str(payload.get("kind", "")),
            "message": str(payload.get("message", "")),
        }
        if data and data.get("operator"):
            event["operator"] = str(data["operator"])
        self._events.append(event)
        for viewer in self._viewers:
            viewer.events.append(event)
            viewer.poke()

    def _ring_seen(self, ring: dict[str, Any]) -> dict[str, Any]:
        """A ring with what the newest analysis says of its reflection."""
        name = ring.get("name")
        intensity = self._latest_hrtem.get(f"intensity.{name}")
        detected = self._latest_hrtem.get(f"d_spacing_m.{name}") is not None
        return {**ring, "detected": detected, "intensity": intensity}
