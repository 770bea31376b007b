"""The processes `insitu-daq demo` (and the benchmarks) start, and what the user sees if one dies.

Each child runs a module of the installed package (core/module_command.py) with its output in a
log file that outlives the demo. When a child is found dead before it was told to stop, the
error names it, its exit code, its log's path and the log's last lines, so the reason (a
traceback, the daemon's one-line refusal of its config) is on the screen, not only on disk.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

LOG_TAIL_LINES = 20
# A child that closed its sockets is about to exit: how long to wait for its exit code before
# concluding that an error it caused is not explained by its death.
EXIT_GRACE_S = 2.0


class ChildExitedError(RuntimeError):
    """A child process ended before it was told to stop (the message shows its log's tail)."""


@dataclass
class ChildProcess:
    name: str  # what the user knows it as: "simulated station", "daemon"
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def exited(self) -> bool:
        return self.process.poll() is not None

    def exit_report(self, lines: int = LOG_TAIL_LINES) -> str:
        """'the daemon exited with code 1; last N lines of its log PATH:' and those lines."""
        return f"the {self.name} exited with code {self.process.poll()}; {self.log_excerpt(lines)}"

    def log_excerpt(self, lines: int = LOG_TAIL_LINES) -> str:
        """'last N lines of its log PATH:' and those lines, indented."""
        tail = log_tail(self.log_path, lines)
        if not tail:
            return f"its log {self.log_path} is empty"
        return f"last {len(tail)} lines of its log {self.log_path}:\n" + "\n".join(
            f"    {line}" for line in tail
        )


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last `lines` lines of a text file (none if it cannot be read)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=lines)]
    except OSError:
        return []


@contextlib.contextmanager
def child_process(
    name: str, command: list[str], log_path: Path, stop_timeout_s: float = 30.0
) -> Iterator[ChildProcess]:
    """Run `command` with its output in `log_path`; SIGTERM it on the way out, then SIGKILL
    it if it has not exited within `stop_timeout_s`."""
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            yield ChildProcess(name, process, log_path)
        finally:
            terminate(process, stop_timeout_s)


def terminate(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM a child that still runs (it stops in order: the daemon ramps the bias down),
    SIGKILL it if it has not exited after `timeout_s`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def check_children(children: Sequence[ChildProcess], grace_s: float = 0.0) -> None:
    """ChildExitedError naming every child that has exited (waiting up to `grace_s` for one to)."""
    deadline = time.monotonic() + grace_s
    while True:
        dead = [child for child in children if child.exited]
        if dead:
            raise ChildExitedError("\n".join(child.exit_report() for child in dead))
        if time.monotonic() >= deadline:
            return
        time.sleep(0.1)


def wait_for_output(child: ChildProcess, text: str, timeout_s: float) -> None:
    """Until `text` is in the child's log; ChildExitedError if it exits first, RuntimeError
    (with the end of its log) if it never appears."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if text in child.log_path.read_text(encoding="utf-8", errors="replace"):
                return
        check_children([child])
        time.sleep(0.1)
    raise RuntimeError(
        f"the {child.name} did not say {text!r} within {timeout_s:g} s; {child.log_excerpt()}"
    )


@contextlib.contextmanager
def reporting_child_deaths(children: Sequence[ChildProcess]) -> Iterator[None]:
    """An error in the block that a child's death explains becomes that child's ChildExitedError."""
    try:
        yield
    except ChildExitedError:
        raise
    except Exception:
        check_children(children, grace_s=EXIT_GRACE_S)
        raise
