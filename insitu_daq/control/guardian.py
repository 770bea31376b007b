"""The bias guardian: a separate process that makes the source-meter safe if the daemon dies
(and a heating holder's heater: off, after the bias; control/heater.py).

Why a process. The daemon makes the bias safe on every way it can see itself stop (signals,
exceptions, atexit), but nothing inside a process survives SIGKILL, a segfault in a C
extension or the OOM killer. The guardian is a small second process the daemon starts first
thing (`Daemon.start`); if the daemon dies without saying "the bias is safe", the guardian
connects to the source-meter, ramps any live output to 0 V at the station's ramp-rate limit in
steps of at most `limits.ramp_step_volts`, switches it off, logs what it did and exits.

How it knows. Its stdin is a pipe whose write end only the daemon holds (subprocess pipes are
close-on-exec, and the ingest process is spawned, not forked, so no other process inherits
it). The kernel closes that end whenever the daemon dies, for any reason, so the guardian
reads EOF at once. A message on the pipe before that ends it differently:

    daemon -> guardian (stdin):  {"config": ..., "time_scale": S, "parent_pid": N}   hello
                                 clean                      bias confirmed safe: just exit
                                 EOF without "clean"        make the source-meter safe now
    guardian -> daemon (stdout): ready                      watching; then stdout is closed

As a second line it also polls `os.getppid()`: if a process the daemon forked without exec
ever kept the write end open, the daemon's death still shows as the guardian being
reparented. (Linux's PR_SET_PDEATHSIG is deliberately not used: it fires when the *thread*
that started the child exits, which would be a false alarm whenever the daemon is started
from a worker thread, and the pipe already wakes the guardian as promptly.)

What it holds. The daemon passes it the descriptor of its source-meter lock (and, with a
heating holder, of its holder lock: the guardian switches that heater off too)
(core/stationlock.py): flock locks belong to the open file, so the lock stays taken while the
guardian lives, even after the daemon is gone. A daemon started while a guardian ramps the bias
down is refused ("still held after daemon PID N exited: its bias guardian is making the bias safe")
instead of connecting to the instrument under it; once the guardian has exited it starts.

What it never does. It holds no instrument connection while the daemon lives (the 2400 has
one controller at a time; the driver is opened only after the daemon is gone), it never
switches an output on, and it never keeps the daemon from exiting: the daemon does not wait
for it, and it sits in its own session, ignoring SIGINT, SIGTERM and SIGHUP, so a Ctrl-C, a
`kill` of the daemon or a closed terminal reaches only the daemon, and the guardian leaves when
its daemon does. SIGKILL removes it by force; a guardian that dies while the daemon runs is
replaced by the daemon's side (`Guardian`), with a CRITICAL log, so the cover has no lasting gap.

Time. The ramp-rate limit is in station seconds; on a time-scaled simulated station the
daemon passes its time scale and the guardian ramps that many times faster on the wall clock,
exactly as the BiasController does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

import pyvisa

from insitu_daq.control import staircase
from insitu_daq.control.bias import DRIVER_ERRORS, BiasController
from insitu_daq.control.heater import make_holder_safe, model_heats
from insitu_daq.control.instruments.factory import open_source_meter, source_meter_class
from insitu_daq.control.limits import LimitError, SafetyCheck
from insitu_daq.control.retry import PERSIST_S, keep_trying
from insitu_daq.control.station import StationError
from insitu_daq.core.config import StationConfig
from insitu_daq.core.module_command import module_command
from insitu_daq.drivers.sourcemeter import SourceMeterError

log = logging.getLogger(__name__)

T = TypeVar("T")

LOG_FILE_NAME = "guardian.log"  # in the station's data_dir
READY = "ready"
CLEAN = "clean"
READY_TIMEOUT_S = 30.0  # a cold interpreter importing pydantic and pyvisa on a busy machine
STAND_DOWN_WAIT_S = 2.0  # the daemon reaps a guardian told "clean" (it exits at once)
PARENT_POLL_S = 0.2  # how often the guardian checks it has not been reparented (and back)
RESTART_INTERVAL_S = 1.0  # at most one guardian restart per interval


class GuardianError(StationError):
    """The guardian could not be started: the daemon refuses to drive the bias without it."""


# ----- the daemon's side ----------------------------------------------------------------------
class Guardian:
    """The daemon's handle on its guardian process.

    `start()` spawns it and returns at once; `wait_ready()` before the bias controller
    connects; at the end exactly one of `stand_down()` (the bias is confirmed safe) or
    `take_over()` (it is not: the guardian makes it safe now, while the daemon goes on
    stopping). If the daemon dies before either, the guardian takes over by itself.

    A guardian that dies while the daemon runs (killed by someone, a bug) would leave the next
    crash uncovered, so a watcher thread logs it (CRITICAL, `restarts_total`) and starts
    another one.
    """

    def __init__(self, config: StationConfig, time_scale: float = 1.0) -> None:
        self.config = config
        self.time_scale = time_scale
        self.restarts_total = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # _process and _finished against the watcher's restart
        self._finished = threading.Event()  # told "clean" or to take over: no more restarts
        self._watcher: threading.Thread | None = None
        self._keep_locked: tuple[int, ...] = ()

    @property
    def pid(self) -> int | None:
        process = self._process
        return None if process is None else process.pid

    @property
    def alive(self) -> bool:
        process = self._process
        return process is not None and process.poll() is None

    @property
    def exit_code(self) -> int | None:
        """0: stood down or made the source-meter safe; 1: could not; None: running."""
        process = self._process
        return None if process is None else process.poll()

    def start(self, keep_locked: tuple[int, ...] = ()) -> None:
        """Spawn it. `keep_locked`: descriptors of station locks (core/stationlock.py) the
        guardian and any replacement inherit, so that they stay locked until it exits: after a
        daemon that died, until the bias is safe."""
        with self._lock:
            if self._process is None:
                self._keep_locked = tuple(keep_locked)
                self._process = self._fail_on_error(self._spawn)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Return once the guardian watches; GuardianError (and no guardian) otherwise."""
        process = self._process
        if process is None:
            raise GuardianError("bias guardian not started")
        self._fail_on_error(lambda: _await_ready(process, timeout_s))
        if self._watcher is None:
            self._watcher = threading.Thread(
                target=self._keep_alive, name="guardian-watch", daemon=True
            )
            self._watcher.start()

    def stand_down(self) -> None:
        """The bias is confirmed safe: the guardian exits without touching the instrument."""
        process = self._finish(CLEAN + "\n")
        if process is None:
            return
        try:
            process.wait(STAND_DOWN_WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("bias guardian pid %d still running after 'clean'", process.pid)
        else:
            log.info("bias guardian stood down")

    def take_over(self) -> None:
        """The bias could not be confirmed safe: the guardian makes it safe now. No wait."""
        process = self._finish(None)
        if process is not None:
            log.critical(
                "bias not confirmed safe: guardian pid %d takes over the source-meter",
                process.pid,
            )

    def _spawn(self) -> subprocess.Popen[bytes]:
        """A guardian process with its hello sent (GuardianError, and none left, on failure)."""
        try:
            process = subprocess.Popen(
                module_command("insitu_daq.control.guardian"),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,  # the terminal's Ctrl-C and hang-up are the daemon's
                close_fds=True,
                pass_fds=self._keep_locked,
            )
        except OSError as exc:
            raise GuardianError(f"cannot run {sys.executable}: {exc}") from exc
        hello = {
            "config": self.config.model_dump(mode="json"),
            "time_scale": self.time_scale,
            "parent_pid": os.getpid(),
        }
        assert process.stdin is not None
        try:
            process.stdin.write(json.dumps(hello).encode() + b"\n")
            process.stdin.flush()
        except OSError as exc:
            _kill(process)
            raise GuardianError(f"cannot talk to it: {exc}") from exc
        return process

    def _fail_on_error(self, call: Callable[[], T]) -> T:
        """`call()`; on GuardianError no guardian is left and none will be started."""
        try:
            return call()
        except GuardianError as exc:
            self._finished.set()
            if self._process is not None:
                _kill(self._process)
            raise GuardianError(f"bias guardian did not start: {exc}") from None

    def _keep_alive(self) -> None:
        """Watcher thread: replace a guardian that exits while it is still needed."""
        last_restart = -math.inf
        while not self._finished.wait(PARENT_POLL_S):
            process = self._process
            if process is None or process.poll() is None:
                continue
            log.critical(
                "bias guardian pid %d exited (code %s) while the daemon runs; starting another",
                process.pid, process.returncode,
            )  # fmt: skip
            # At once the first time; a guardian that keeps failing must not spin.
            if self._finished.wait(last_restart + RESTART_INTERVAL_S - time.monotonic()):
                return
            last_restart = time.monotonic()
            with self._lock:
                if self._finished.is_set():
                    return
                self.restarts_total += 1
                try:
                    self._process = self._spawn()
                except GuardianError as exc:
                    log.critical("bias guardian restart failed: %s", exc)
                    continue  # the dead process stays: the next poll tries again
                replacement = self._process
            try:
                _await_ready(replacement, READY_TIMEOUT_S)
            except GuardianError as exc:
                log.critical("bias guardian restart failed: %s", exc)
                _kill(replacement)

    def _finish(self, message: str | None) -> subprocess.Popen[bytes] | None:
        """Send `message` (if any) and close the pipe; None if there is nothing to tell."""
        with self._lock:
            process = self._process
            if process is None or self._finished.is_set():
                return None
            self._finished.set()
        assert process.stdin is not None
        try:
            if message is not None:
                process.stdin.write(message.encode())
            process.stdin.close()
        except OSError as exc:  # it is already gone: it acted, or died (its log says which)
            log.error("bias guardian pid %d unreachable: %s", process.pid, exc)
            with contextlib.suppress(OSError):
                process.stdin.close()
        return process


def _await_ready(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait for the guardian's "ready" line, then close its stdout; GuardianError otherwise."""
    stdout = process.stdout
    assert stdout is not None
    replies: queue.Queue[bytes] = queue.Queue()
    # A thread, not select(): portable to pipes everywhere; it ends with the pipe.
    reader = threading.Thread(
        target=lambda: replies.put(stdout.readline()), name="guardian-ready", daemon=True
    )
    reader.start()
    try:
        reply = replies.get(timeout=timeout_s)
    except queue.Empty:
        raise GuardianError(f"no answer within {timeout_s:g} s") from None
    if reply.strip() != READY.encode():
        raise GuardianError(f"it answered {reply!r} (exit code {process.poll()})")
    stdout.close()
    log.info("bias guardian pid %d is watching", process.pid)


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        process.kill()
    process.wait()


def bias_confirmed_safe(bias: BiasController) -> bool:
    """After `bias.stop()`: True if the output is known off, or the daemon never reached it.

    Known off: the controller's last word from the instrument is "output off" and it did not
    lose the instrument. Never reached (no identity): this daemon never switched it on.
    """
    if bias.identity is None:
        return True
    state = bias.state
    return not state.output_on and not state.lost


# ----- the guardian process -------------------------------------------------------------------
def _wall_rate(config: StationConfig, time_scale: float) -> float:
    """The ramp-rate limit in volts per wall second."""
    return config.limits.max_ramp_rate_volts_per_s * time_scale


def _make_safe_once(
    config: StationConfig, time_scale: float, manager: pyvisa.ResourceManager | None
) -> None:
    meter_config = config.source_meter
    meter = open_source_meter(meter_config, manager)
    with contextlib.closing(meter):
        identity = meter.identify()
        name = f"{identity.model} #{identity.serial} at {meter_config.resource}"
        on = meter.output_enabled()
        level = meter.voltage_setpoint()
        if not on:
            log.info("source-meter %s: output already off (level %+.4g V); nothing to do",
                     name, level)  # fmt: skip
            return
        rate = _wall_rate(config, time_scale)
        step = config.limits.ramp_step_volts
        log.warning(
            "source-meter %s: output ON at %+.4g V; ramping to 0 V at %g V/s"
            " (%g V/s station, time scale %g) in steps of at most %g V",
            name, level, rate, config.limits.max_ramp_rate_volts_per_s, time_scale, step,
        )  # fmt: skip
        began = time.monotonic()
        steps: list[float] = []
        # The first step one interval after now: the daemon may have changed the level just
        # before it died.
        check = SafetyCheck(config.limits)
        staircase.ramp(meter.set_voltage, level, 0.0, step, rate, on_step=steps.append, check=check)
        meter.output_off()
        if meter.output_enabled():
            raise SourceMeterError("output still on after :OUTP OFF")
        log.warning(
            "source-meter %s: at 0 V after %d steps in %.3f s; output OFF",
            name, len(steps), time.monotonic() - began,
        )  # fmt: skip


def make_source_meter_safe(
    config: StationConfig,
    time_scale: float = 1.0,
    manager: pyvisa.ResourceManager | None = None,
    persist_s: float = PERSIST_S,
) -> bool:
    """Connect (retrying with back-off), ramp a live output to 0 V, switch it off.

    Each attempt starts from the level the instrument reports, so a connection lost mid-ramp
    resumes where it stopped. Nobody else is left to make the bias safe, so after the
    configured retries it keeps trying every `retry.max_delay_s` for `persist_s`. Returns
    False if the instrument could not be made safe in that time.
    """
    name = f"source-meter {config.source_meter.resource}"
    try:
        return keep_trying(
            lambda: _make_safe_once(config, time_scale, manager),
            name,
            config.retry,
            DRIVER_ERRORS,
            persist_s,
            # Raised at once (LimitError is a ValueError, a driver error too): persisting
            # cannot make a level the limits refuse acceptable.
            fatal=(LimitError,),
        )
    except LimitError as exc:
        log.critical("%s NOT made safe: %s", name, exc)
        return False


def _watch(messages: IO[bytes], parent_pid: int) -> str:
    """Block until the daemon says "clean" (returns "clean") or is gone (returns why)."""
    lines: queue.Queue[bytes] = queue.Queue()

    def read() -> None:
        for line in messages:
            lines.put(line)
        lines.put(b"")  # EOF

    threading.Thread(target=read, name="guardian-pipe", daemon=True).start()
    unexpected_total = 0
    while True:
        try:
            line = lines.get(timeout=PARENT_POLL_S)
        except queue.Empty:
            if os.getppid() != parent_pid:
                return f"daemon pid {parent_pid} is gone (reparented)"
            continue
        if not line:
            return f"daemon pid {parent_pid} is gone (its pipe closed without 'clean')"
        if line.strip() == CLEAN.encode():
            return CLEAN
        unexpected_total += 1
        log.error("ignored unexpected message #%d from the daemon: %r", unexpected_total, line)


def _log_to(data_dir: Path) -> None:
    """Everything also to <data_dir>/guardian.log: the operator's record of what happened."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(data_dir / LOG_FILE_NAME, encoding="utf-8")
    except OSError as exc:
        log.error("cannot write %s: %s (logging to stderr only)", data_dir / LOG_FILE_NAME, exc)
        return
    handler.setFormatter(logging.getLogger().handlers[0].formatter)
    logging.getLogger().addHandler(handler)


def main() -> int:
    # The guardian leaves when its daemon does; signals meant for the daemon must not end it.
    for signum in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is not None:
            signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s guardian[%(process)d] %(levelname)s %(message)s",
    )
    # Unbuffered: nothing read ahead into a buffer, and no buffer lock for the watching thread
    # to hold at exit (a daemon thread blocked in a buffered read aborts the interpreter).
    pipe = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)  # noqa: SIM115
    hello_line = pipe.readline()
    if not hello_line:
        log.error("no daemon (stdin closed before the hello)")
        return 2
    try:
        hello = json.loads(hello_line)
        config = StationConfig.model_validate(hello["config"])
        time_scale = float(hello["time_scale"])
        parent_pid = int(hello["parent_pid"])
    except (ValueError, KeyError, TypeError) as exc:
        log.error("bad hello from the daemon: %s", exc)
        return 2
    _log_to(config.data_dir)

    # Everything is imported and the VISA backend loaded now, not after the daemon died: the
    # rescue must not depend on importing anything (the installation may be mid-upgrade by
    # then). The factory caches the driver class it resolves here for the rescue's open. A
    # resource manager holds no instrument session.
    source_meter_class(config.source_meter.model)
    heats = model_heats(config)  # imports (and caches) the holder's driver class now too
    manager = pyvisa.ResourceManager(config.source_meter.visa_library)
    sys.stdout.write(READY + "\n")
    sys.stdout.flush()
    sys.stdout.close()
    log.info("watching daemon pid %d; source-meter %s", parent_pid, config.source_meter.resource)
    verdict = _watch(pipe, parent_pid)
    if verdict == CLEAN:
        log.info("daemon pid %d stopped with the bias safe; standing down", parent_pid)
        return 0
    log.warning("%s: making the source-meter safe", verdict)
    # A heating holder's heater off (control/heater.py) alongside: each keeps trying for
    # minutes when its instrument does not answer, and must not hold up the other.
    heater: list[bool] = []
    heater_thread = threading.Thread(
        target=lambda: heater.append(make_holder_safe(config)), name="guardian-heater"
    )
    if heats:
        log.warning("%s: switching the heating holder's heater off", verdict)
        heater_thread.start()
    try:
        safe = make_source_meter_safe(config, time_scale, manager)
    finally:
        manager.close()
        if heats:
            heater_thread.join()
    return 0 if safe and all(heater) else 1


if __name__ == "__main__":
    raise SystemExit(main())
