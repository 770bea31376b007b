"""What both ends of the control API and event stream share: default endpoints, the JSON
encoding (plain types only, no NaN) and one-line texts."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np

DEFAULT_CONTROL_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_EVENTS_ENDPOINT = "tcp://127.0.0.1:5556"


def squash(text: str) -> str:
    """One line: newlines and runs of spaces become single spaces."""
    return " ".join(text.split())


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays unwrapped, paths as text, NaN/inf as null."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def encode_json(value: Any) -> bytes:
    """Compact, standard JSON (no NaN) of `value`; raises TypeError for what JSON cannot hold."""
    return json.dumps(_jsonable(value), separators=(",", ":"), allow_nan=False).encode()
