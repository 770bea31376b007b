"""The physical model of the open-cell nanobattery, shared by every simulated instrument.

No I/O lives here: the simulated source-meter, holder, microscope and camera all read and
drive one `NanobatteryModel`, so what the camera shows is what the source-meter measured.

Geometry (projected, in nm). The origin is the point where the tip meets the particle; the
tip approaches along +x. The particle is a disk of radius R*sqrt(1 + expansion) whose left
edge stays at the contact point, so it grows away from the tip. The tip apex is at
(tip_position_nm, 0); it touches the particle when tip_position_nm >= 0.

Electrochemistry (SCIENCE.md, electrical model; *model choice* where marked). With the tip in
contact, the source-meter output on and the holder routing it to the particle, the current is

    I(V) = max(0, V - OCV(x)) / R_series   faradaic, only while x < 1 (delithiation)
         + V / R_leak                      leakage through the Li2O layer
         + V / R_short                     only when a short is injected (tip on the grid)

with OCV(x) = 3.6 V + 0.65 V * x. Below the OCV nothing happens: pristine LiNiO2 cannot take
more lithium and the rock-salt conversion is irreversible, so a 0 V or floating tip leaves the
particle as it is (the control experiment). A fraction `faradaic_efficiency` of the charge
delithiates the particle: dx/dt = eta * I_faradaic / Q. The remainder is parasitic (Li2O
decomposition, surface leakage). That fraction is a model choice: SCIENCE.md asks for nA
currents and a ~110 s conversion of a particle holding only 3e-10 C, which together imply
that well under 1 % of the current delithiates the particle.

Structure. The transformed area fraction of the projected particle equals x: a pristine
(layered) core of radius R_eff*sqrt(1 - x) sits tangent to the far side, so the reaction front
starts at the contact surface and sweeps to the far side (shrinking core). A band
`disordered_band_nm` wide outside the core is Ni/Li disordered; everything else behind it is
rock salt. A `surface_layer_nm` disordered layer covers the pristine particle (SCIENCE.md).
The projected area grows by `expansion_max` as x goes from `expansion_onset_x` to
`expansion_complete_x` (the 27 s and 60 s marks at +4.3 V).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np


class Phase(IntEnum):
    """Label of a point of the projected field of view."""

    VACUUM = 0
    LAYERED = 1
    DISORDERED = 2
    ROCK_SALT = 3
    TIP = 4


class BiasRouting:
    """Where the holder connects the particle's electrical line."""

    SOURCE_METER = "source_meter"
    GROUND = "ground"
    FLOAT = "float"
    ALL = (SOURCE_METER, GROUND, FLOAT)


@dataclass(frozen=True)
class CellParameters:
    """Numbers of the nanobattery. Defaults reproduce SCIENCE.md's +4.3 V timeline."""

    particle_radius_nm: float = 250.0
    capacity_coulomb: float = 3.0e-10
    ocv_x0_volts: float = 3.6
    ocv_x1_volts: float = 4.25
    series_resistance_ohm: float = 5.0e8
    # Chosen so x reaches 1 at 110 s under +4.3 V (see module docstring).
    faradaic_efficiency: float = 0.005537
    leakage_resistance_ohm: float = 1.0e13
    short_resistance_ohm: float = 1.0e4
    expansion_max: float = 0.306
    expansion_onset_x: float = 0.5135  # x at 27 s under +4.3 V
    expansion_complete_x: float = 0.8217  # x at 60 s under +4.3 V
    disordered_band_nm: float = 15.0
    surface_layer_nm: float = 5.0
    initial_gap_nm: float = 3000.0
    # How far the piezo may push past first contact before the controller calls over-travel.
    overtravel_limit_nm: float = 20.0
    tip_radius_nm: float = 60.0
    max_step_s: float = 0.05

    def ocv(self, x: float) -> float:
        return self.ocv_x0_volts + (self.ocv_x1_volts - self.ocv_x0_volts) * x

    def expansion(self, x: float) -> float:
        """Projected-area expansion (A/A0 - 1) reached at lithium extraction x."""
        span = self.expansion_complete_x - self.expansion_onset_x
        u = min(1.0, max(0.0, (x - self.expansion_onset_x) / span))
        return self.expansion_max * u * u * (3.0 - 2.0 * u)

    def front_position_nm(self, x: float) -> float:
        """Distance of the reaction front from the contact surface along the contact axis."""
        radius = self.particle_radius_nm * math.sqrt(1.0 + self.expansion(x))
        return 2.0 * radius * (1.0 - math.sqrt(max(0.0, 1.0 - x)))


# Where the specimen has drifted to at a model time: (x, y) in nm, in the image's axes (+x
# along the frame's columns, +y along its rows), relative to model time 0. The renderer draws
# the field displaced by it and the truth reports it (render.py, microscope.py). The hook for
# a drift that is not linear (a heating holder's, growing with temperature): assign any such
# function to `NanobatteryModel.drift`; it is called with the model time under the station
# lock, so it may read a temperature the model integrates, and must be cheap and pure.
DriftLaw = Callable[[float], tuple[float, float]]


@dataclass(frozen=True)
class LinearDrift:
    """Drift at a constant velocity (the room-temperature biasing case): `speed_nm_s` along
    `direction_deg` (0 = +x, the frame's columns; 90 = +y, its rows). The default is still."""

    speed_nm_s: float = 0.0
    direction_deg: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.speed_nm_s) and self.speed_nm_s >= 0):
            raise ValueError(f"drift speed must be >= 0 nm/s, not {self.speed_nm_s!r}")
        if not math.isfinite(self.direction_deg):
            raise ValueError(f"drift direction must be finite, not {self.direction_deg!r}")

    def __call__(self, time_s: float) -> tuple[float, float]:
        angle = math.radians(self.direction_deg)
        distance = self.speed_nm_s * time_s
        return distance * math.cos(angle), distance * math.sin(angle)


@dataclass(frozen=True)
class CellState:
    """Ground truth of the cell at one model time (what a perfect measurement would give)."""

    time_s: float
    bias_volts: float
    current_amperes: float
    in_compliance: bool
    x: float
    front_position_nm: float
    front_velocity_nm_s: float
    expansion: float
    particle_radius_nm: float
    core_radius_nm: float
    phase_fractions: dict[str, float]
    contact: bool
    tip_position_nm: float
    overtravel: bool
    bias_routing: str
    short_circuit: bool
    beam_on: bool
    dose_rate_e_per_a2_s: float
    cumulative_dose_e_per_a2: float


@dataclass
class _SourceSetting:
    output_on: bool = False
    level_volts: float = 0.0
    compliance_amperes: float = 1.0e-7


@dataclass
class _TipMotion:
    target_nm: float
    speed_nm_s: float
    stop_at_contact: bool = False


@dataclass
class NanobatteryModel:
    """State of one particle-tip cell, advanced in model time by `advance_to`."""

    params: CellParameters = field(default_factory=CellParameters)
    seed: int = 0
    time_s: float = 0.0
    x: float = 0.0
    tip_position_nm: float = field(default=math.nan)
    overtravel: bool = False
    bias_routing: str = BiasRouting.SOURCE_METER
    short_circuit: bool = False
    beam_on: bool = False
    dose_rate_e_per_a2_s: float = 35.0
    cumulative_dose_e_per_a2: float = 0.0
    charge_coulomb: float = 0.0
    drift: DriftLaw = field(default_factory=LinearDrift)  # the field's offset (DriftLaw)
    _source: _SourceSetting = field(default_factory=_SourceSetting)
    _motion: _TipMotion | None = None
    # (model time, applied bias) at each change: the truth for frame-to-bias alignment.
    bias_history: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=100_000))

    def __post_init__(self) -> None:
        if math.isnan(self.tip_position_nm):
            self.tip_position_nm = -self.params.initial_gap_nm
        self.rng = np.random.default_rng(self.seed)
        self.bias_history.append((self.time_s, 0.0))

    # ----- inputs from the instruments -------------------------------------------------------
    def set_source(self, output_on: bool, level_volts: float, compliance_amperes: float) -> None:
        """What the source-meter is sourcing (called by the simulated source-meter)."""
        self._source = _SourceSetting(output_on, float(level_volts), abs(compliance_amperes))
        self._record_bias()

    def set_bias_routing(self, routing: str) -> None:
        if routing not in BiasRouting.ALL:
            raise ValueError(f"unknown bias routing {routing!r}")
        self.bias_routing = routing
        self._record_bias()

    def set_short_circuit(self, shorted: bool) -> None:
        """Fault injection: the tip touches the grid, the current runs to compliance."""
        self.short_circuit = shorted
        self._record_bias()

    def set_beam(self, on: bool, dose_rate_e_per_a2_s: float | None = None) -> None:
        self.beam_on = on
        if dose_rate_e_per_a2_s is not None:
            self.dose_rate_e_per_a2_s = float(dose_rate_e_per_a2_s)

    def move_tip_to(
        self, target_nm: float, speed_nm_s: float, stop_at_contact: bool = False
    ) -> None:
        """Start moving the tip apex toward target_nm at speed_nm_s (holder motion).

        stop_at_contact: the controller's contact sensing halts a forward move the moment the
        tip touches the particle (an approach), instead of driving on to target_nm.
        """
        if speed_nm_s <= 0:
            raise ValueError("speed must be positive")
        if target_nm < self.tip_position_nm:
            self.overtravel = False  # backing off clears the over-travel condition
        self._motion = _TipMotion(float(target_nm), float(speed_nm_s), stop_at_contact)

    def stop_tip(self) -> None:
        self._motion = None

    @property
    def tip_moving(self) -> bool:
        return self._motion is not None

    # ----- electrical solution ---------------------------------------------------------------
    @property
    def contact(self) -> bool:
        return self.tip_position_nm >= 0.0

    def _connected(self) -> bool:
        return self.bias_routing == BiasRouting.SOURCE_METER

    def _faradaic_current(self, volts: float) -> float:
        if not self.contact or self.x >= 1.0:
            return 0.0
        overpotential = volts - self.params.ocv(self.x)
        return max(0.0, overpotential) / self.params.series_resistance_ohm

    def load_current(self, volts: float) -> float:
        """Current drawn by the cell through the source-meter terminals at `volts`."""
        if not self._connected():
            return 0.0
        current = 0.0
        if self.contact:
            current += self._faradaic_current(volts)
            current += volts / self.params.leakage_resistance_ohm
        if self.short_circuit:
            current += volts / self.params.short_resistance_ohm
        return current

    def terminal(self) -> tuple[float, float, bool]:
        """(voltage, current, in_compliance) at the source-meter terminals, noise-free.

        A voltage source in compliance lowers its output until the current equals the limit,
        as a 2400 does; I(V) is monotonic, so bisection finds that voltage.
        """
        src = self._source
        if not src.output_on:
            return 0.0, 0.0, False
        volts = src.level_volts
        current = self.load_current(volts)
        if abs(current) <= src.compliance_amperes:
            return volts, current, False
        low, high = 0.0, volts
        for _ in range(60):
            mid = 0.5 * (low + high)
            if abs(self.load_current(mid)) > src.compliance_amperes:
                high = mid
            else:
                low = mid
        limit = math.copysign(src.compliance_amperes, volts)
        return low, limit, True

    def applied_bias(self) -> float:
        """Bias across the cell: the source-meter's terminal voltage when routed to it."""
        if self.bias_routing == BiasRouting.SOURCE_METER:
            return self.terminal()[0]
        return 0.0

    def _record_bias(self) -> None:
        bias = self.applied_bias()
        if self.bias_history[-1][1] != bias:
            self.bias_history.append((self.time_s, bias))

    def bias_at(self, time_s: float) -> float:
        """Applied bias at a past model time (piecewise constant between changes)."""
        result = self.bias_history[0][1]
        for t, v in reversed(self.bias_history):
            if t <= time_s:
                return v
        return result

    # ----- time evolution --------------------------------------------------------------------
    def advance_to(self, time_s: float) -> None:
        """Integrate to model time `time_s` in steps of at most params.max_step_s."""
        while self.time_s < time_s:
            dt = min(self.params.max_step_s, time_s - self.time_s)
            self._step(dt)

    def _step(self, dt: float) -> None:
        p = self.params
        volts, total, in_compliance = self.terminal()
        faradaic = self._faradaic_current(volts) if self._connected() else 0.0
        if faradaic > 0.0:
            # Closed form of dx/dt = eta (V - OCV0 - s x) / (R Q) over dt at constant V:
            # exact for any partition of time while the bias holds still.
            slope = p.ocv_x1_volts - p.ocv_x0_volts
            x_inf = (volts - p.ocv_x0_volts) / slope
            rate = p.faradaic_efficiency * slope / (p.series_resistance_ohm * p.capacity_coulomb)
            if in_compliance:
                self.x += p.faradaic_efficiency * faradaic * dt / p.capacity_coulomb
            else:
                self.x = x_inf - (x_inf - self.x) * math.exp(-rate * dt)
            self.x = min(1.0, self.x)
        self.charge_coulomb += total * dt
        if self.beam_on:
            self.cumulative_dose_e_per_a2 += self.dose_rate_e_per_a2_s * dt
        self._move_tip(dt)
        self.time_s += dt
        self._record_bias()

    def _move_tip(self, dt: float) -> None:
        motion = self._motion
        if motion is None:
            return
        distance = motion.target_nm - self.tip_position_nm
        travel = math.copysign(min(abs(distance), motion.speed_nm_s * dt), distance)
        new_position = self.tip_position_nm + travel
        if motion.stop_at_contact and travel > 0 and new_position >= 0.0:
            # Contact sensing trips within the step: the tip rests where it first touches.
            self.tip_position_nm = max(self.tip_position_nm, 0.0)
            self._motion = None
            return
        if new_position > self.params.overtravel_limit_nm:
            # The controller stops the piezo instead of crushing the particle.
            self.tip_position_nm = self.params.overtravel_limit_nm
            self.overtravel = True
            self._motion = None
            return
        self.tip_position_nm = new_position
        if self.tip_position_nm == motion.target_nm:
            self._motion = None

    # ----- structure -------------------------------------------------------------------------
    def field_offset_nm(self) -> tuple[float, float]:
        """Where the specimen has drifted to now (DriftLaw): (x, y) nm in the image's axes."""
        x_nm, y_nm = self.drift(self.time_s)
        return float(x_nm), float(y_nm)

    @property
    def expansion(self) -> float:
        return self.params.expansion(self.x)

    @property
    def particle_radius_nm(self) -> float:
        return self.params.particle_radius_nm * math.sqrt(1.0 + self.expansion)

    @property
    def core_radius_nm(self) -> float:
        return self.particle_radius_nm * math.sqrt(max(0.0, 1.0 - self.x))

    @property
    def front_position_nm(self) -> float:
        return self.params.front_position_nm(self.x)

    def front_velocity_nm_s(self) -> float:
        """d(front position)/dt at the present bias, by the chain rule through x."""
        p = self.params
        volts = self.applied_bias()
        faradaic = self._faradaic_current(volts) if self._connected() else 0.0
        if faradaic <= 0.0 or self.x >= 1.0:
            return 0.0
        dx_dt = p.faradaic_efficiency * min(faradaic, self._source.compliance_amperes)
        dx_dt /= p.capacity_coulomb
        h = 1e-6
        lo, hi = max(0.0, self.x - h), min(1.0, self.x + h)
        dfront_dx = (p.front_position_nm(hi) - p.front_position_nm(lo)) / (hi - lo)
        return dfront_dx * dx_dt

    def phase_at(self, x_nm: np.ndarray, y_nm: np.ndarray) -> np.ndarray:
        """Phase label (uint8) at points of the projected field, in the contact frame (nm)."""
        p = self.params
        radius = self.particle_radius_nm
        core = self.core_radius_nm
        px = np.asarray(x_nm, dtype=np.float32) - np.float32(radius)
        py = np.asarray(y_nm, dtype=np.float32)
        r_particle = np.hypot(px, py)
        core_cx = np.float32(radius - core)  # core centre, particle frame
        r_core = np.hypot(px - core_cx, py)
        labels = np.zeros(np.broadcast(px, py).shape, dtype=np.uint8)
        inside = r_particle <= radius
        labels[inside] = Phase.ROCK_SALT
        band = inside & (r_core <= core + p.disordered_band_nm)
        labels[band] = Phase.DISORDERED
        pristine = inside & (r_core <= core) & (r_particle <= radius - p.surface_layer_nm)
        labels[pristine] = Phase.LAYERED
        needle = (self.tip_outside_nm(x_nm, y_nm) <= 0) & ~inside
        labels[needle] = Phase.TIP
        return labels

    def tip_outside_nm(self, x_nm: np.ndarray, y_nm: np.ndarray) -> np.ndarray:
        """How far points lie outside the tungsten needle (nm, float32; <= 0 inside): the
        larger of the distance beyond its side and beyond its apex. The needle is a
        cone-ended rod coming from -x, apex at tip_position_nm. Near its outline this is the
        distance to it (to 6 % on the cone), which the renderer uses for partial pixels."""
        tx = np.asarray(x_nm, dtype=np.float32) - np.float32(self.tip_position_nm)
        half_width = np.float32(self.params.tip_radius_nm) + np.maximum(-tx, 0) * np.float32(0.35)
        return np.maximum(np.abs(np.asarray(y_nm, dtype=np.float32)) - half_width, tx)

    def phase_fractions(self, grid: int = 256) -> dict[str, float]:
        """Area fractions of the particle's phases, on a grid x grid sampling of its disk."""
        radius = self.particle_radius_nm
        axis = (np.arange(grid, dtype=np.float32) + 0.5) / grid * 2 * radius
        xs, ys = np.meshgrid(axis, axis - radius)
        labels = self.phase_at(xs, ys)
        counts = np.bincount(labels.ravel(), minlength=len(Phase))
        particle = counts[Phase.LAYERED] + counts[Phase.DISORDERED] + counts[Phase.ROCK_SALT]
        return {
            phase.name.lower(): float(counts[phase] / particle)
            for phase in (Phase.LAYERED, Phase.DISORDERED, Phase.ROCK_SALT)
        }

    def snapshot(self) -> CellState:
        _, current, in_compliance = self.terminal()
        return CellState(
            time_s=self.time_s,
            bias_volts=self.applied_bias(),
            current_amperes=current,
            in_compliance=in_compliance,
            x=self.x,
            front_position_nm=self.front_position_nm,
            front_velocity_nm_s=self.front_velocity_nm_s(),
            expansion=self.expansion,
            particle_radius_nm=self.particle_radius_nm,
            core_radius_nm=self.core_radius_nm,
            phase_fractions=self.phase_fractions(),
            contact=self.contact,
            tip_position_nm=self.tip_position_nm,
            overtravel=self.overtravel,
            bias_routing=self.bias_routing,
            short_circuit=self.short_circuit,
            beam_on=self.beam_on,
            dose_rate_e_per_a2_s=self.dose_rate_e_per_a2_s,
            cumulative_dose_e_per_a2=self.cumulative_dose_e_per_a2,
        )
