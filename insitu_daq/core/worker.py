"""The daemon's spawned worker processes (ingest, live analysis): both halves of their lifecycle.

Child side: `start_worker_process`, what every worker does first.

Parent side: `WorkerHandle`, the base of the daemon's handles (ingest/client.py `IngestClient`,
live/client.py `LiveAnalysis`). It owns what they share: a private temp dir (mode 0700, so
only this user can connect) holding the ipc endpoints, one ZeroMQ context with the sockets the
handle binds, the `spawn` process, a listener thread on the socket the worker reports on, the
ready event with its timeout, `alive`/`pid`, an atexit hook, and an idempotent `stop`: ask the
worker to stop (the subclass's way: `_ask_to_stop`), join, terminate, kill, then close the
sockets and context and remove the temp dir. The message formats stay the subclasses' own
(`_on_message` gets each multipart message from the worker).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import zmq

log = logging.getLogger(__name__)

LISTEN_POLL_MS = 100  # how often the listener thread looks at its closing flag
KILL_GRACE_S = 2.0  # after terminate (SIGTERM), then after kill, wait this long


def start_worker_process(name: str, log_level: int) -> None:
    """Leave Ctrl-C to the daemon (it stops its workers in order) and log as `name[pid]`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )


class WorkerHandle(ABC):
    """The daemon's handle on one spawned worker process (module docstring).

    A subclass sets `name` (temp dir prefix, thread and process names, log and error texts)
    and `error` (raised when the worker does not start), binds its sockets with `_bind`, spawns
    with `_spawn`, and implements `_on_message(parts)` (listener thread; it sets `_ready` when
    the worker says it is up) and `_ask_to_stop(timeout_s)` (the first step of `stop`).
    """

    name: ClassVar[str]
    error: ClassVar[type[Exception]] = RuntimeError
    stop_timeout_s: ClassVar[float] = 10.0

    def __init__(self, start_timeout_s: float = 30.0) -> None:
        self.start_timeout_s = start_timeout_s
        self.process: multiprocessing.process.BaseProcess | None = None
        self._tmpdir: str | None = None
        self._context: zmq.Context | None = None
        self._sockets: list[zmq.Socket] = []
        self._send_lock = threading.Lock()  # sends, and closing the sockets
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._listener: threading.Thread | None = None
        self._shut = False

    # ----- setting up ------------------------------------------------------------------------
    def endpoint(self, label: str) -> str:
        """The ipc endpoint `label` in this handle's private temp dir (made on first use)."""
        if self._tmpdir is None:
            self._tmpdir = tempfile.mkdtemp(prefix=f"insitu-{self.name}-")  # mode 0700
        return f"ipc://{self._tmpdir}/{label}"

    def _bind(self, kind: int, label: str, **options: int) -> zmq.Socket:
        """A socket of `kind` bound at `endpoint(label)`, LINGER 0 plus `options`."""
        if self._context is None:
            self._context = zmq.Context()
        socket = self._context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        for option, value in options.items():
            socket.setsockopt(getattr(zmq, option), value)
        socket.bind(self.endpoint(label))
        self._sockets.append(socket)
        return socket

    def _spawn(
        self,
        inbox: zmq.Socket,
        target: Callable[..., None],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Listen on `inbox`, then spawn `target(*args, **kwargs)` (returns at once)."""
        self._listener = threading.Thread(
            target=self._listen, args=(inbox,), name=f"{self.name}-reports", daemon=True
        )
        self._listener.start()
        self.process = multiprocessing.get_context("spawn").Process(
            target=target, args=args, kwargs=kwargs or {}, name=f"insitu-daq-{self.name}",
            daemon=True,
        )  # fmt: skip
        self.process.start()
        atexit.register(self.stop)

    @staticmethod
    def _parent_args() -> tuple[int, int]:
        """(parent pid, log level): what every worker gets to watch the daemon and log."""
        return os.getpid(), logging.getLogger().getEffectiveLevel()

    def wait_ready(self) -> None:
        """Block until the worker says it is up (`error` if it died or timed out: stopped)."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + self.start_timeout_s
        while not self._ready.wait(0.05):
            if not self.process.is_alive() or time.monotonic() > deadline:
                code = self.process.exitcode
                self.stop()
                raise self.error(f"{self.name} process did not start (exit code {code})")

    # ----- state -----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    # ----- the worker's messages -------------------------------------------------------------
    def _listen(self, socket: zmq.Socket) -> None:
        while not self._closing.is_set():
            try:
                if not socket.poll(LISTEN_POLL_MS):
                    continue
                parts = socket.recv_multipart()
            except zmq.ZMQError:
                if self._closing.is_set():
                    return
                log.exception("%s reports", self.name)
                self._closing.wait(LISTEN_POLL_MS / 1e3)  # a broken socket must not spin
                continue
            try:
                self._on_message(parts)
            except Exception:
                log.exception("unreadable report from the %s process", self.name)

    @abstractmethod
    def _on_message(self, parts: list[bytes]) -> None:
        """One message from the worker (listener thread). Set `_ready` when it is up."""

    # ----- stopping --------------------------------------------------------------------------
    @abstractmethod
    def _ask_to_stop(self, timeout_s: float) -> None:
        """Ask the worker to stop, in its own protocol (may wait up to `timeout_s`)."""

    def stop(self, timeout_s: float | None = None) -> None:
        """Ask the worker to stop, join it (terminate, then kill it if it does not), release
        sockets, context and temp dir. Idempotent; called at exit if not before."""
        if self._shut:
            return
        timeout = self.stop_timeout_s if timeout_s is None else timeout_s
        process = self.process
        if process is not None and process.is_alive():
            self._ask_to_stop(timeout)
        self._shut = True
        atexit.unregister(self.stop)
        if process is not None:
            process.join(timeout)
            if process.is_alive():
                log.error("%s process %d did not stop; terminating it", self.name, process.pid)
                process.terminate()
                process.join(KILL_GRACE_S)
            if process.is_alive():
                process.kill()
                process.join(KILL_GRACE_S)
        self._closing.set()
        if self._listener is not None:
            self._listener.join(KILL_GRACE_S)
        with self._send_lock:
            for socket in self._sockets:
                socket.close(linger=0)
            self._sockets.clear()
        if self._context is not None:
            self._context.term()
            self._context = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
