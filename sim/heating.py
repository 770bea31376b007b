"""The physics of a MEMS heating chip (Protochips Fusion class), shared by the simulated holder.

No I/O lives here (sim/model.py style): the simulated heating holder controller
(sim/heating_holder.py) drives one `HeatingChip` and reads it back; anything else that needs
the temperature (the renderer, field drift) reads `HeatingChip.temperature_at(t)` on the same
model clock (SimStation advances the chip with the nanobattery model).

The controller. It ramps its *setpoint* toward the target at the set ramp rate (C per model
second), never stepping it; switching the heater on starts the setpoint at the chip's present
temperature, so nothing steps there either. Heater off: no power; the setpoint follows the chip.

The chip. A closed temperature loop (the controller's PID acting on the membrane heater) seen
from outside as a second-order system driven by the setpoint:

    T'' = omega^2 (T_setpoint - T) - 2 zeta omega T'

with zeta = 0.5 and omega = 2 rad/s (*model choice*): a sudden 15 C setpoint change overshoots
by 16 % (2.4 C, "a few degrees") and settles to 2 % in 4/(zeta omega) = 4 s; a ramp at rate r
is followed with a lag of 2 zeta r / omega (0.05 C at 0.1 C/s), and overshoots its end by
about r x 0.15 s (0.015 C at the heating study's 0.1 C/s, 1.7 C at 10 C/s; measured by
tests/sim/test_heating.py). A MEMS membrane's own thermal time constant is milliseconds, so
with the heater off the chip is back at room temperature within `off_time_constant_s` (5 ms).

Heater electrical model. A Pt-like thin-film heater: R = R0 (1 + alpha (T - T_room)), alpha =
3.85e-3 /K (platinum), R0 = 100 ohm at room temperature (*model choice*, typical of MEMS
heaters). Power is what holds the membrane above room temperature plus what warms it:
P = (T - T_room) / R_th + C_th dT/dt, with R_th = 16000 K/W (about 30 mW at 500 C, the order
of a Fusion chip) and C_th = 2e-6 J/K (*model choices*).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChipParameters:
    """Numbers of the chip and its controller loop (see the module docstring)."""

    room_temperature_c: float = 22.0
    max_temperature_c: float = 1200.0  # the chip's rating: the controller refuses above it
    zeta: float = 0.5
    omega_rad_s: float = 2.0
    off_time_constant_s: float = 0.005
    r0_ohm: float = 100.0
    alpha_per_k: float = 3.85e-3
    thermal_resistance_k_per_w: float = 16_000.0
    heat_capacity_j_per_k: float = 2e-6
    max_step_s: float = 0.02  # integration step (omega x step = 0.04: RK4 is exact enough)
    history_interval_s: float = 0.05  # model seconds between samples of temperature_at's history
    history_max: int = 400_000  # samples kept (5.5 h at 0.05 s)


@dataclass(frozen=True)
class ChipState:
    """The chip and its controller at one model time (what a perfect readout would give)."""

    time_s: float
    temperature_c: float
    setpoint_c: float  # the controller's ramping setpoint
    target_c: float  # where the setpoint is ramping to
    ramp_rate_c_per_s: float
    heater_on: bool
    power_w: float
    resistance_ohm: float


@dataclass
class HeatingChip:
    """The chip's temperature (and its controller's setpoint), advanced by `advance_to`."""

    params: ChipParameters = field(default_factory=ChipParameters)
    time_s: float = 0.0
    heater_on: bool = False
    ramp_rate_c_per_s: float = 1.0
    temperature_c: float = math.nan
    _rate_of_change: float = 0.0  # dT/dt, C/s
    _setpoint_c: float = math.nan
    _target_c: float = math.nan
    _times: list[float] = field(default_factory=list)
    _temperatures: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        room = self.params.room_temperature_c
        if math.isnan(self.temperature_c):
            self.temperature_c = room
        self._setpoint_c = self._target_c = self.temperature_c
        self._record()

    # ----- inputs from the controller --------------------------------------------------------
    def switch_heater(self, on: bool) -> None:
        """On: the setpoint starts where the chip is (no step). Off: no power."""
        if on and not self.heater_on:
            self._setpoint_c = self._target_c = self.temperature_c
        self.heater_on = on
        if not on:
            self._setpoint_c = self._target_c = self.temperature_c

    def set_target(self, celsius: float) -> None:
        """Ramp the setpoint to `celsius` at the ramp rate (the heater must be on)."""
        if not self.heater_on:
            raise ValueError("heater is off")
        self._target_c = float(celsius)

    def set_ramp_rate(self, c_per_s: float) -> None:
        if not c_per_s > 0:
            raise ValueError("ramp rate must be positive")
        self.ramp_rate_c_per_s = float(c_per_s)

    def hold(self) -> None:
        """Stop the setpoint's ramp where it is now."""
        self._target_c = self._setpoint_c

    # ----- readings --------------------------------------------------------------------------
    @property
    def setpoint_c(self) -> float:
        return self._setpoint_c

    @property
    def target_c(self) -> float:
        return self._target_c

    @property
    def ramping(self) -> bool:
        return self._setpoint_c != self._target_c

    def resistance_ohm(self) -> float:
        p = self.params
        return p.r0_ohm * (1.0 + p.alpha_per_k * (self.temperature_c - p.room_temperature_c))

    def power_w(self) -> float:
        """Heater power now: what holds the membrane above room temperature, plus what warms
        it (never negative: a heater cannot cool)."""
        if not self.heater_on:
            return 0.0
        p = self.params
        rise = self.temperature_c - p.room_temperature_c
        power = rise / p.thermal_resistance_k_per_w + p.heat_capacity_j_per_k * self._rate_of_change
        return max(0.0, power)

    def snapshot(self) -> ChipState:
        return ChipState(
            time_s=self.time_s,
            temperature_c=self.temperature_c,
            setpoint_c=self._setpoint_c,
            target_c=self._target_c,
            ramp_rate_c_per_s=self.ramp_rate_c_per_s,
            heater_on=self.heater_on,
            power_w=self.power_w(),
            resistance_ohm=self.resistance_ohm(),
        )

    def temperature_at(self, time_s: float) -> float:
        """The chip's temperature (C) at a past model time: the history kept every
        `history_interval_s`, interpolated (the truth for the renderer, drift and tests; at
        most `history_max` samples back, older times give the oldest kept)."""
        times = self._times
        if time_s >= self.time_s:
            return self.temperature_c
        i = bisect.bisect_right(times, time_s)
        if i == 0:
            return self._temperatures[0]
        if i >= len(times):
            return self._temperatures[-1]
        t0, t1 = times[i - 1], times[i]
        y0, y1 = self._temperatures[i - 1], self._temperatures[i]
        return y0 + (y1 - y0) * (time_s - t0) / (t1 - t0)

    # ----- time evolution --------------------------------------------------------------------
    def advance_to(self, time_s: float) -> None:
        """Integrate to model time `time_s`."""
        while self.time_s < time_s:
            if self._at_rest():  # nothing moves: jump (a cold chip costs nothing to keep)
                self.time_s = time_s
                self._record()
                return
            dt = min(self.params.max_step_s, time_s - self.time_s)
            self._step(dt)
            self._record()

    def _at_rest(self) -> bool:
        if self.ramping or self._rate_of_change != 0.0:
            return False
        goal = self._setpoint_c if self.heater_on else self.params.room_temperature_c
        return self.temperature_c == goal

    def _setpoint_after(self, dt: float) -> float:
        span = self._target_c - self._setpoint_c
        move = self.ramp_rate_c_per_s * dt
        return self._target_c if abs(span) <= move else self._setpoint_c + math.copysign(move, span)

    def _step(self, dt: float) -> None:
        p = self.params
        if not self.heater_on:
            # The membrane's own time constant: back at room temperature within milliseconds.
            room = p.room_temperature_c
            decay = math.exp(-dt / p.off_time_constant_s)
            self.temperature_c = room + (self.temperature_c - room) * decay
            if abs(self.temperature_c - room) < 1e-9:
                self.temperature_c = room
            self._setpoint_c = self._target_c = self.temperature_c
            self._rate_of_change = 0.0
            self.time_s += dt
            return
        w2, damping = p.omega_rad_s**2, 2.0 * p.zeta * p.omega_rad_s

        def derivative(t: float, temp: float, rate: float) -> tuple[float, float]:
            return rate, w2 * (self._setpoint_after(t) - temp) - damping * rate

        temp, rate = self.temperature_c, self._rate_of_change
        k1 = derivative(0.0, temp, rate)
        k2 = derivative(dt / 2, temp + dt / 2 * k1[0], rate + dt / 2 * k1[1])
        k3 = derivative(dt / 2, temp + dt / 2 * k2[0], rate + dt / 2 * k2[1])
        k4 = derivative(dt, temp + dt * k3[0], rate + dt * k3[1])
        temp += dt / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        rate += dt / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        self._setpoint_c = self._setpoint_after(dt)
        # Settled to far below any readout's resolution: at rest, so advance_to can jump.
        if not self.ramping and abs(temp - self._setpoint_c) < 1e-6 and abs(rate) < 1e-6:
            temp, rate = self._setpoint_c, 0.0
        self.temperature_c, self._rate_of_change = temp, rate
        self.time_s += dt

    def _record(self) -> None:
        times = self._times
        if times and self.time_s - times[-1] < self.params.history_interval_s:
            return
        times.append(self.time_s)
        self._temperatures.append(self.temperature_c)
        if len(times) > self.params.history_max:
            del times[: len(times) // 2]
            del self._temperatures[: len(self._temperatures) // 2]
