"""Which driver class a station config's `model` key names, and opening one from its section.

The registries hold "module:Class" strings, so importing this module (the config does, to check
a `model`) imports no driver; a class is imported when first asked for and cached. A process
that must import nothing later (the guardian, once its daemon has died) resolves its class
early, and opening it afterwards finds it in the cache.

A new model is one driver module and one line here.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyvisa

    from insitu_daq.control.instruments import Holder, Microscope, SourceMeter
    from insitu_daq.core.config import HolderConfig, MicroscopeConfig, SourceMeterConfig

SOURCE_METERS = {
    "keithley2400": "insitu_daq.drivers.sourcemeter.keithley2400:Keithley2400",
    "keithley2450": "insitu_daq.drivers.sourcemeter.keithley2450:Keithley2450",
}
HOLDERS = {"open_cell": "insitu_daq.drivers.holder:OpenCellHolder"}
MICROSCOPES = {"remote": "insitu_daq.drivers.microscope:RemoteMicroscope"}

# The config section of each kind -> its registry (core/config.py checks `model` against these).
MODELS = {"source_meter": SOURCE_METERS, "holder": HOLDERS, "microscope": MICROSCOPES}


def unknown_model(kind: str, model: str) -> str | None:
    """Why `model` is not a known `kind` model (one line), or None when it is known."""
    known = MODELS[kind]
    if model in known:
        return None
    return f"unknown model {model!r}; known: {', '.join(sorted(known))}"


@functools.cache
def _resolve(kind: str, model: str) -> Any:
    why = unknown_model(kind, model)
    if why is not None:
        raise ValueError(f"{kind}.model: {why}")
    module_name, _, class_name = MODELS[kind][model].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def source_meter_class(model: str) -> type[SourceMeter]:
    return _resolve("source_meter", model)


def holder_class(model: str) -> type[Holder]:
    return _resolve("holder", model)


def microscope_class(model: str) -> type[Microscope]:
    return _resolve("microscope", model)


def open_source_meter(
    config: SourceMeterConfig, resource_manager: pyvisa.ResourceManager | None = None
) -> SourceMeter:
    """A connected source-meter of the configured model (its errors: SourceMeterError)."""
    cls = source_meter_class(config.model)
    return cls(  # type: ignore[call-arg]  # the constructor convention of SourceMeter
        config.resource, config.timeout_s, config.visa_library, resource_manager=resource_manager
    )


def open_holder(config: HolderConfig) -> Holder:
    cls = holder_class(config.model)
    return cls(config.port, timeout=config.timeout_s)  # type: ignore[call-arg]


def open_microscope(config: MicroscopeConfig) -> Microscope:
    cls = microscope_class(config.model)
    return cls(config.host, config.port, timeout=config.timeout_s)  # type: ignore[call-arg]
