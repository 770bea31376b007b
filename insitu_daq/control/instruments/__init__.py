"""The instruments the daemon drives (source-meter, holder, microscope), seen through small typed
protocols (a heating holder is a holder with a heater: `HeatingHolder`).

Drivers satisfy these structurally (ophyd-async style typed devices): a driver in drivers/ never
imports control/, and the daemon, the bias controller, the guardian and the positioners name
only these protocols. Which class implements one is the station config's `model` key, resolved
by `factory.py`. The data types the methods return (`Reading`, `HolderStatus`...) are the
drivers' model-neutral ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: importing this module loads no driver (or pyvisa)
    from insitu_daq.drivers.heating_holder import HeatingHolderStatus
    from insitu_daq.drivers.holder import HolderStatus
    from insitu_daq.drivers.microscope import Illumination, ImagingMode, MicroscopeState
    from insitu_daq.drivers.sourcemeter import Identity, Reading


class Link(Protocol):
    """What any driver declares so a retrying link can tell a lost link from a refusal."""

    # The exceptions the driver raises for its instrument: a refusal (an answer) or a lost link.
    ERRORS: ClassVar[tuple[type[Exception], ...]]

    @staticmethod
    def lost(exc: BaseException) -> bool:
        """True when `exc` (one of ERRORS) means the link failed: worth a reconnect and a retry."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class SourceMeter(Protocol):
    """A voltage source that measures current (a Keithley 2400, a 2450...).

    Constructed by the factory as `cls(resource, timeout_s, backend, resource_manager=...)`.
    Errors are `SourceMeterError` (`SourceMeterTimeout` for silence); a reading taken with the
    output off raises `OutputOffError`. `Reading.status` is the model's raw status word, kept
    within bits 0-30 (core/records.py marks level changes with bit 31); its meaning is the
    driver's, so `Reading.in_compliance` and `Reading.overflow` are what callers look at.
    """

    def identify(self) -> Identity: ...

    def configure_voltage_source(
        self,
        compliance_amperes: float,
        voltage_range_volts: float | None = None,
        current_range_amperes: float | None = None,
        nplc: float = 1.0,
    ) -> None: ...

    def set_voltage(self, volts: float) -> None: ...

    def voltage_setpoint(self) -> float: ...

    def output_on(self) -> None: ...

    def output_off(self) -> None: ...

    def output_enabled(self) -> bool: ...

    def read(self) -> Reading: ...

    def in_compliance(self) -> bool: ...

    def errors(self) -> list[tuple[int, str]]: ...

    def close(self) -> None: ...


@runtime_checkable
class Holder(Link, Protocol):
    """A biasing holder's positioner: approach to contact, fine and coarse moves, bias routing.

    Constructed by the factory as `cls(port_or_url, timeout=...)`. A model with more readings
    (a heating holder's temperature) returns a status with more attributes and names them in
    SERIES; the holder monitor (monitor.py) records them without further code.
    """

    # The time series it reports: series name (a `Log` of runfile/layout.py whose `record` it
    # is) -> the attributes of `status()` giving that log's columns, in the log's order.
    SERIES: ClassVar[dict[str, tuple[str, ...]]]

    def identify(self) -> str: ...

    def status(self) -> HolderStatus: ...

    def approach(self, speed_nm_s: float, max_travel_nm: float) -> None: ...

    def move_fine(self, distance_nm: float) -> None: ...

    def coarse_step(self, count: int) -> None: ...

    def stop(self) -> None: ...

    def set_bias_routing(self, routing: str) -> None: ...


@runtime_checkable
class HeatingHolder(Holder, Protocol):
    """A holder with a heater (a MEMS heating chip): the controller ramps its own setpoint at
    the rate it is given (C per station second). What control/heater.py and the temperature
    steps use; `heater.heats(driver)` tells a holder model that has one."""

    def status(self) -> HeatingHolderStatus: ...

    def heater_on(self) -> None: ...

    def heater_off(self) -> None: ...

    def heater_enabled(self) -> bool: ...

    def set_ramp_rate(self, c_per_s: float) -> None: ...

    def set_temperature(self, celsius: float) -> None: ...

    def hold(self) -> None: ...


@runtime_checkable
class Microscope(Link, Protocol):
    """What insitu-daq asks of a TEM. Doses in e/A^2, dose rates in e/A^2/s, lengths in nm.

    Every vendor has its own scripting API: a real microscope is supported by wrapping it in a
    class with these methods. Constructed by the factory as `cls(host, port, timeout=...)`.
    """

    def identify(self) -> str: ...

    def state(self) -> MicroscopeState: ...

    def blank_beam(self) -> None: ...

    def unblank_beam(self, dose_rate_e_per_a2_s: float | None = None) -> None: ...

    def set_dose_rate(self, dose_rate_e_per_a2_s: float) -> None: ...

    def set_mode(self, mode: ImagingMode | str) -> None: ...

    def set_pixel_size(self, pixel_size_nm: float) -> None: ...

    def set_field_center(self, x_nm: float, y_nm: float) -> None: ...

    def cumulative_dose(self) -> float: ...

    def illumination(self) -> Illumination:
        """Beam current at the specimen (0 blanked) and illuminated area: the dose rate a TEM
        can measure (service/dose.py; a wrapper that cannot raises, and the config's
        `[dose] dose_rate_e_per_a2_s` stands in)."""
        ...
