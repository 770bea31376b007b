"""The worker-process handle (core/worker.py), on real spawned processes and ipc sockets.

The ingest and analysis handles are exercised end to end in test_ingest.py and
test_liveanalysis.py; here, what only a misbehaving worker shows: one that ignores being
asked and SIGTERM is killed, one that dies before it is up is reported with its exit code,
and either way nothing is left behind (process, temp dir with the ipc endpoints).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import zmq

from insitu_daq.core.worker import WorkerHandle, start_worker_process


class WorkerStartError(RuntimeError):
    pass


def _stubborn_worker(report_endpoint: str, parent_pid: int, log_level: int) -> None:
    """Says it is up, then ignores SIGTERM and every request."""
    start_worker_process("stubborn", log_level)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    context = zmq.Context()
    reports = context.socket(zmq.PUSH)
    reports.connect(report_endpoint)
    reports.send(b"ready")
    while True:
        time.sleep(1.0)


def _dying_worker(report_endpoint: str, parent_pid: int, log_level: int) -> None:
    os._exit(3)


class Handle(WorkerHandle):
    name = "testworker"
    error = WorkerStartError

    def __init__(self) -> None:
        super().__init__(start_timeout_s=30.0)
        self.asked = 0
        self.messages: list[list[bytes]] = []

    def start(self, target: object) -> None:
        reports = self._bind(zmq.PULL, "reports")
        self._spawn(reports, target, (self.endpoint("reports"), *self._parent_args()))  # type: ignore[arg-type]

    def _on_message(self, parts: list[bytes]) -> None:
        self.messages.append(parts)
        if parts == [b"ready"]:
            self._ready.set()

    def _ask_to_stop(self, timeout_s: float) -> None:
        self.asked += 1


def test_a_worker_ignoring_the_stop_request_and_sigterm_is_killed_and_nothing_is_left() -> None:
    handle = Handle()
    handle.start(_stubborn_worker)
    handle.wait_ready()
    tmpdir = handle.endpoint("reports").removeprefix("ipc://").rsplit("/", 1)[0]
    assert handle.alive and os.path.isdir(tmpdir)
    assert oct(os.stat(tmpdir).st_mode & 0o777) == oct(0o700)  # only this user can connect
    handle.stop(timeout_s=0.5)
    assert handle.asked == 1
    assert not handle.alive
    assert handle.process is not None and handle.process.exitcode == -signal.SIGKILL
    assert not os.path.exists(tmpdir)
    handle.stop()  # idempotent: not asked again
    assert handle.asked == 1


def test_a_worker_dying_before_it_is_up_is_refused_with_its_exit_code() -> None:
    handle = Handle()
    handle.start(_dying_worker)
    tmpdir = handle.endpoint("reports").removeprefix("ipc://").rsplit("/", 1)[0]
    with pytest.raises(
        WorkerStartError, match=r"^testworker process did not start \(exit code 3\)$"
    ):
        handle.wait_ready()
    assert handle.asked == 0  # nothing to ask: it is gone
    assert not os.path.exists(tmpdir)
