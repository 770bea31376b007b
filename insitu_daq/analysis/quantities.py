"""The live-analysis quantities, each declared once: what every user of a result reads.

A result's `values` (analysis/pipeline.py) maps keys to numbers. Each key is one `Quantity`,
declared here with everything its users need, the way a LiberTEM UDF declares its result
buffers: its unit and place in the run file (runfile/analysislog.py builds /entry/analysis
from these), its Prometheus gauge (service/metrics.py), whether a protocol's `until:` may use it
(control/conditions.py), its line in `insitu-daq report` (report/analysis.py) and its panel in
the report figure (report/figure.py). A new quantity is its computation (a function in an
analysis module registered with `@measures(mode, QUANTITY)`, analysis/measurement.py) plus its
declaration here; its users iterate `QUANTITIES`.

Families: a quantity `per` "reflection" has one key per tracked reflection (the run's
ReflectionTable), `per` "phase" one per phase (reflections.PHASES); its key has `{}` where the
member's name goes, and its run-file group is an NXcollection with one NXlog per member.

No numpy or scipy here: the ingest process, the daemon and the report import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .reflections import PHASES, ReflectionTable

Per = Literal["reflection", "phase"]

# How long (event-time s) a condition on an analysis quantity must hold before it ends a step,
# unless it says `for N s` (control/conditions.py). The quantities come from dose sums of noisy
# low-dose frames: one result can be off (a phase map that saw LM frames, a segmentation on a
# bad sum), so it takes 2 s of agreeing results (~40 at 20 a second).
ANALYSIS_PERSISTENCE_S = 2.0

# The keys of a live result, besides its `values`, that the daemon forwards to the run file and
# the event stream (live/client.py builds the result; runfile/analysislog.py writes them).
RESULT_KEYS = ("time", "image_id", "mode", "latency_s", "skipped", "settling",
               "integrated_frames", "values", "received_ns")  # fmt: skip


@dataclass(frozen=True)
class Metric:
    """The quantity's Prometheus gauge: `insitu_daq_<name>`, labelled by the family member
    (`reflection` or `phase`) for a family. The value shown is the result's times `scale`
    (metrics are in base units: nm -> m)."""

    name: str
    help: str
    scale: float = 1.0


@dataclass(frozen=True)
class Text:
    """The quantity's line in `insitu-daq report`: first and last value times `scale`, with
    `unit`. A family's `label` has `{}` for the member (underscores shown as spaces)."""

    label: str
    scale: float = 1.0
    unit: str = ""


@dataclass(frozen=True)
class Panel:
    """Where the report figure draws the quantity: the panel `name` (DrawnFigure.panels) in
    `row` (0 is the bias) of the left column, values times `scale`. Quantities with the same
    row share the panel; the first declared gives its labels. With `note`, the quantity is not
    a line but its latest value written on the panel (`note` formats it)."""

    name: str
    row: int
    ylabel: str
    empty: str  # "<empty>: not measured" when nothing was measured
    scale: float = 1.0
    colour: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Quantity:
    key: str  # the result's key; a family's has "{}" for the member: "{}_fraction"
    unit: str | None  # @units of its column in the run file (None: no units attribute)
    group: str  # /entry/analysis/<group> (a family: /<group>/<member>)
    column: str = "value"  # its dataset in that NXlog; columns of one group share its time
    per: Per | None = None
    description: str = ""  # what it is, for people (the condition grammar's list)
    note: str = ""  # the run file column's `description` attribute ("" for none)
    metric: Metric | None = None
    condition: bool = False  # usable in a hold's `until:`
    persistence_s: float = ANALYSIS_PERSISTENCE_S
    text: Text | None = None
    panel: Panel | None = None

    def key_for(self, member: str) -> str:
        """The result key of one member of a family (the key itself for a single quantity)."""
        return self.key.format(member) if self.per else self.key

    def describe(self, member: str) -> str:
        """The description, of one member of a family (its name, underscores as spaces)."""
        return self.description.format(member.replace("_", " ")) if self.per else self.description

    def member_of(self, key: str) -> str | None:
        """The member `key` is this family's key for (None if it is not; "" for a single
        quantity's own key). Phases are a fixed set; reflections are the run's table."""
        if self.per is None:
            return "" if key == self.key else None
        prefix, _, suffix = self.key.partition("{}")
        if len(key) <= len(prefix) + len(suffix):
            return None
        if not (key.startswith(prefix) and key.endswith(suffix)):
            return None
        member = key[len(prefix) : len(key) - len(suffix)]
        return member if self.per == "reflection" or member in PHASES else None


D_SPACING = Quantity(
    "d_spacing_m.{}", "m", "d_spacing", per="reflection",
    description="measured d of reflection {}, in metres (not detected: none)",
    metric=Metric("d_spacing_meters", "measured lattice spacing of a tracked reflection"),
)  # fmt: skip
INTENSITY = Quantity(
    "intensity.{}", None, "d_spacing", column="intensity", per="reflection",
    description="relative power above background in the window of reflection {}",
    note="relative power above background in the reflection's window (spectrum.py)",
    metric=Metric(
        "reflection_intensity_ratio",
        "relative power of a tracked reflection above background (dimensionless)",
    ),
    panel=Panel("reflections", 1, "reflection\nintensity", "reflection intensities"),
)  # fmt: skip
PHASE_FRACTION = Quantity(
    "{}_fraction", "1", "phase_fraction", per="phase",
    description="fraction of the particle in the HRTEM field classified {} (0-1)",
    metric=Metric(
        "phase_fraction_ratio",
        "fraction (0-1) of the particle in the HRTEM field classified as a phase",
    ),
    condition=True,
    text=Text("{} fraction"),
    panel=Panel("phase_fractions", 2, "phase fraction\n(HRTEM field)", "phase fractions"),
)  # fmt: skip
# Not usable in a condition: 0.2-1.6 % of the maps of a field without rock salt see a false
# rock-salt tile (phasemap.py), so `rock_salt_presence > 0` would end a hold on noise within a
# minute or two; its onset wants 3 maps in a row (verify/accuracy.py), which a condition on one
# value cannot say.
PHASE_PRESENCE = Quantity(
    "{}_presence", "1", "phase_fraction", column="presence", per="phase",
    description="share of the particle tiles in which the marker of {} is seen at all (0-1)",
    note="share of the particle tiles in which the phase's marker is detected, whichever "
    "phase the tile was classified (phasemap.py)",
    metric=Metric(
        "phase_presence_ratio",
        "share (0-1) of the particle tiles in the HRTEM field in which a phase is seen at all",
    ),
)  # fmt: skip
FRONT_POSITION = Quantity(
    "front_position_nm", "nm", "front_position",
    description="reaction front distance from the contact surface (nm)",
    metric=Metric(
        "front_position_meters", "reaction front distance from the contact surface", 1e-9
    ),
    condition=True,
    text=Text("front position", unit=" nm"),
    panel=Panel("front_position", 3, "front from\ncontact (nm)", "front position",
                colour="tab:purple"),
)  # fmt: skip
FRONT_VELOCITY = Quantity(
    "front_velocity_nm_s", "nm/s", "front_velocity",
    description="reaction front speed (nm/s)",
    metric=Metric(
        "front_velocity_meters_per_second",
        "reaction front speed (Theil-Sen over a sliding window)",
        1e-9,
    ),
    condition=True,
    text=Text("front speed", unit=" nm/s"),
    panel=Panel("front_position", 3, "", "", note="latest speed {:.2f} nm/s"),
)  # fmt: skip
EXPANSION = Quantity(
    "expansion", "1", "expansion",
    description="projected size growth relative to the pre-bias reference (0.25 = +25 %)",
    metric=Metric(
        "expansion_ratio",
        "projected-area growth of the particle relative to the pre-bias reference",
    ),
    condition=True,
    text=Text("expansion", 100.0, " %"),
    panel=Panel("expansion", 4, "expansion (%)", "expansion", 100.0, colour="tab:brown"),
)  # fmt: skip
PROJECTED_AREA = Quantity(
    "projected_area_m2", "m^2", "projected_area",
    description="projected area of the particle (m^2, low magnification)",
    metric=Metric(
        "projected_area_square_meters", "projected area of the particle (low magnification)"
    ),
    condition=True,
)  # fmt: skip
# The field's drift (analysis/drift.py): where the specimen has moved to since the run's first
# frame, in the frame's axes (+x along its columns, +y along its rows), and how fast. Measured
# only where the station turns drift on ([analysis] drift = true).
DRIFT_X = Quantity(
    "drift_x_nm", "nm", "drift", column="x",
    description="field drift along the frame's x (columns) since the run's first frame (nm)",
    metric=Metric("drift_x_meters", "field drift along x since the run's first frame", 1e-9),
    text=Text("drift x", unit=" nm"),
)  # fmt: skip
DRIFT_Y = Quantity(
    "drift_y_nm", "nm", "drift", column="y",
    description="field drift along the frame's y (rows) since the run's first frame (nm)",
    metric=Metric("drift_y_meters", "field drift along y since the run's first frame", 1e-9),
    text=Text("drift y", unit=" nm"),
)  # fmt: skip
# Usable in `until:`: a heating step holds until the drift has settled (drift_rate_nm_s < 0.1).
DRIFT_RATE = Quantity(
    "drift_rate_nm_s", "nm/s", "drift", column="rate",
    description="field drift speed (nm/s, Theil-Sen over a sliding window)",
    metric=Metric(
        "drift_rate_meters_per_second",
        "field drift speed (Theil-Sen over a sliding window)",
        1e-9,
    ),
    condition=True,
    text=Text("drift rate", unit=" nm/s"),
)  # fmt: skip

# Every quantity, in the order its users list them.
QUANTITIES: tuple[Quantity, ...] = (
    D_SPACING, INTENSITY, PHASE_FRACTION, PHASE_PRESENCE,
    FRONT_POSITION, FRONT_VELOCITY, EXPANSION, PROJECTED_AREA,
    DRIFT_X, DRIFT_Y, DRIFT_RATE,
)  # fmt: skip


def registered() -> tuple[Quantity, ...]:
    """The declared quantities. Users call this when they build (a run file's log, a metrics
    registry, a condition's vocabulary) rather than binding the tuple at import."""
    return QUANTITIES


def members(quantity: Quantity, reflections: Sequence[str]) -> tuple[str, ...]:
    """The members of a family (the run's reflections, or the phases); ("",) for a single."""
    if quantity.per == "reflection":
        return tuple(reflections)
    if quantity.per == "phase":
        return PHASES
    return ("",)


def find(key: str) -> tuple[Quantity, str] | None:
    """The quantity a result key belongs to, and the member (None: not a declared key)."""
    for quantity in registered():
        member = quantity.member_of(key)
        if member is not None:
            return quantity, member
    return None


def value_keys(table: ReflectionTable) -> tuple[str, ...]:
    """Every key a result for `table` can carry."""
    return tuple(
        quantity.key_for(member)
        for quantity in registered()
        for member in members(quantity, table.names)
    )
