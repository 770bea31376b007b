"""Scripted acquisition from Python: build protocols from steps and run them on the daemon.

    from insitu_daq.service.client import DaemonClient
    from insitu_daq.control.protocol import Acquire, Approach, Bias, Hold, Protocol

    staircase = Protocol(name="staircase", steps=[
        Approach(max_travel_nm=5000), Acquire(action="start"),
        *[s for volts in (3.8, 4.0, 4.3) for s in (Bias(volts=volts), Hold(duration_s=30))],
        Bias(volts=0), Acquire(action="stop"),
    ])
    with DaemonClient() as daemon:
        final = daemon.run(staircase)          # blocks until the run file is closed
        print(final["protocol"]["state"], daemon.last_run_file)

The protocol is validated here (pydantic) and again by the daemon against its limits.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from insitu_daq.control.protocol import Protocol
from insitu_daq.service.api import ControlClient

FINAL_STATES = ("finished", "aborted", "failed")


class DaemonClient:
    """The control API as methods; one per command."""

    def __init__(self, control: str = "tcp://127.0.0.1:5555", timeout_s: float = 10.0) -> None:
        self._client = ControlClient(control, timeout_s=timeout_s)
        self.last_run_id: str | None = None
        self.last_run_file: str | None = None

    def start(self, protocol: Protocol | str | Path) -> dict[str, Any]:
        """Start a protocol (object, file path or YAML text); returns run_id and run_file."""
        if isinstance(protocol, Path) or (isinstance(protocol, str) and "\n" not in protocol):
            protocol = Protocol.load(protocol)
        elif isinstance(protocol, str):
            protocol = Protocol.parse(protocol, "yaml")
        reply = self._client.request(
            "run", protocol_text=protocol.text, format="yaml", name=protocol.name
        )
        self.last_run_id, self.last_run_file = reply["run_id"], reply["run_file"]
        return reply

    def wait(self, run_id: str, timeout_s: float | None = None, poll_s: float = 0.2) -> dict:
        """Block until the run ended and its file is closed; returns the final status."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.status()
            done = status["last_run_id"] == run_id and status["run_id"] is None
            if done and status["protocol"]["state"] in FINAL_STATES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still going after {timeout_s} s")
            time.sleep(poll_s)

    def run(self, protocol: Protocol | str | Path, timeout_s: float | None = None) -> dict:
        """start() then wait(): the final status."""
        return self.wait(self.start(protocol)["run_id"], timeout_s)

    def status(self) -> dict[str, Any]:
        return self._client.request("status")

    def pause(self, reason: str | None = None) -> None:
        self._client.request("pause", **({"reason": reason} if reason else {}))

    def resume(self) -> None:
        self._client.request("resume")

    def abort(self, reason: str | None = None) -> None:
        self._client.request("abort", **({"reason": reason} if reason else {}))

    def mark(self, text: str) -> None:
        self._client.request("mark", text=text)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
