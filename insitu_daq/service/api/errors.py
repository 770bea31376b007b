"""The errors the control API and event stream raise (each message one line)."""

from __future__ import annotations


class ApiError(RuntimeError):
    """The control API or event stream could not do what was asked (one-line message)."""


class ControlError(ApiError):
    """The daemon answered `ok: false`; the message is its one-line reason."""


class ControlTimeoutError(ApiError, TimeoutError):
    """No reply within the client's timeout (daemon not running, busy, or unreachable)."""
