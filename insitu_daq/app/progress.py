"""Live progress of a run for `insitu-daq run`: one line per status update from the daemon."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

FINAL_STATES = ("finished", "aborted", "failed")


def format_temperature(temperature: dict[str, Any] | None) -> str:
    """A heating holder's chip in a status line: `212.4 C (set 215.0)`, `22.0 C (heater off)`;
    "" for a station without a heater (its status has no `temperature`)."""
    if temperature is None:
        return ""
    celsius = temperature.get("temperature_c")
    if celsius is None:
        return "chip -"
    if not temperature.get("heater_on"):
        return f"{celsius:6.1f} C (heater off)"
    setpoint = temperature.get("setpoint_c")
    return f"{celsius:6.1f} C (set {setpoint:.1f})" if setpoint is not None else f"{celsius:6.1f} C"


def format_status(status: dict[str, Any]) -> str:
    """`[  12.3 s] 4/8 hold  +4.300 V (set +4.300)  1.234 nA  frames 480 (lost 0)  running`,
    with a heating holder's chip after the current (`  212.4 C (set 215.0)`)."""
    protocol = status.get("protocol", {})
    bias = status.get("bias", {})
    ingest = status.get("ingest", {})
    step = protocol.get("step_index")
    count = protocol.get("step_count")
    where = f"{step + 1}/{count} {protocol.get('step_kind', '')}" if step is not None else "-"
    remaining = protocol.get("hold_remaining_s")
    if remaining is not None:
        where += f" ({remaining:.1f} s left)"
    volts, setpoint, amps = bias.get("voltage"), bias.get("setpoint"), bias.get("current")
    bias_text = "bias -" if volts is None else f"{volts:+.4f} V (set {setpoint:+.3f})"
    current_text = "" if amps is None else f"{amps * 1e9:8.3f} nA"
    chip = format_temperature(status.get("temperature"))
    current_text += f"  {chip}" if chip else ""
    frames = ingest.get("frames_written_total", 0)
    lost = ingest.get("frames_dropped_total", 0)
    elapsed = protocol.get("run_elapsed_s") or 0.0
    return (
        f"[{elapsed:7.1f} s] {where:<28} {bias_text:<26} {current_text}  "
        f"frames {frames} (lost {lost})  {protocol.get('state', '?')}"
    )


def follow_run(
    control: str,
    events: str,
    run_id: str,
    timeout_s: float = 5.0,
    out: TextIO = sys.stdout,
    daemon_alive: Callable[[], bool] = lambda: True,
) -> int:
    """Print status until the run ends; Ctrl-C aborts the run (the bias is made safe first).

    Returns 0 when the protocol finished, 1 when it was aborted or failed, or when no status
    came for `timeout_s` (5 s at least) or `daemon_alive()` says the daemon is gone (a caller
    that started it knows at once); the last line says how it ended, and why when it did not
    finish (`run <id>: failed: disk full in /data (...)`).
    """
    from insitu_daq.service.api import ControlClient, EventSubscriber

    state, reason = "?", None
    with EventSubscriber(events, topics=["status"]) as subscriber:
        last_heard = time.monotonic()
        try:
            while True:
                message = subscriber.receive(timeout_s=1.0)
                if message is None:
                    if not daemon_alive():
                        print("the daemon has stopped", file=out, flush=True)
                        return 1
                    if time.monotonic() - last_heard > max(timeout_s, 5.0):
                        print("no status from the daemon", file=out, flush=True)
                        return 1
                    continue
                last_heard = time.monotonic()
                _, status = message
                print(format_status(status), file=out, flush=True)
                state = status.get("protocol", {}).get("state", "?")
                reason = status.get("protocol", {}).get("reason")
                # Done once the protocol ended and the daemon closed the run file.
                closed = status.get("last_run_id") == run_id and status.get("run_id") is None
                if closed and state in FINAL_STATES:
                    break
        except KeyboardInterrupt:
            print("\ninterrupted: aborting the run (bias to 0 V, output off)", file=out, flush=True)
            with ControlClient(control, timeout_s=timeout_s) as client:
                client.request("abort", reason="operator interrupted `insitu-daq run`")
            return 1
    why = f": {reason}" if reason and state != "finished" else ""
    print(f"run {run_id}: {state}{why}", file=out, flush=True)
    return 0 if state == "finished" else 1
