"""Which driver class a station config's `model` key names, and opening one from its section.

The model names and their "module:Class" strings are declared in core/instrument_models.py
(the config checks a `model` against them without importing any driver); a class is imported
here when first asked for, and cached. A process
that must import nothing later (the guardian, once its daemon has died) resolves its class
early, and opening it afterwards finds it in the cache.

A new model is one driver module and one line in core/instrument_models.py.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

from insitu_daq.core.instrument_models import MODELS, unknown_model

if TYPE_CHECKING:
    import pyvisa

    from insitu_daq.control.instruments import Holder, Microscope, SourceMeter
    from insitu_daq.core.config import HolderConfig, MicroscopeConfig, SourceMeterConfig


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
