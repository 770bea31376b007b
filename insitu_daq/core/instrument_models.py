"""The instrument models a station config may name, and the driver class of each.

One line per model: the config's `model` key -> "module:Class" of its driver. Strings only, so
that the config can check a `model` (core/config.py) and the factory can import the class when
it is first needed (control/instruments/factory.py) without this module importing any driver.
"""

from __future__ import annotations

SOURCE_METERS = {
    "keithley2400": "insitu_daq.drivers.sourcemeter.keithley2400:Keithley2400",
    "keithley2450": "insitu_daq.drivers.sourcemeter.keithley2450:Keithley2450",
}
HOLDERS = {
    "open_cell": "insitu_daq.drivers.holder:OpenCellHolder",
    "mems_heating": "insitu_daq.drivers.heating_holder:MemsHeatingHolder",
}
MICROSCOPES = {"remote": "insitu_daq.drivers.microscope:RemoteMicroscope"}

# The config section of each kind -> its models (core/config.py checks `model` against these).
MODELS = {"source_meter": SOURCE_METERS, "holder": HOLDERS, "microscope": MICROSCOPES}


def unknown_model(kind: str, model: str) -> str | None:
    """Why `model` is not a known `kind` model (one line), or None when it is known."""
    known = MODELS[kind]
    if model in known:
        return None
    return f"unknown model {model!r}; known: {', '.join(sorted(known))}"
