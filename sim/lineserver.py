"""Line-oriented transports for simulated instruments: a TCP server and a pseudo-terminal.

Instrument controllers speak short request/reply lines over a serial line or a TCP socket.
Both transports here split the byte stream into lines (CR, LF or CR LF end a line), hand each
line to the instrument's handler and write back the handler's reply, so the instrument's state
machine never touches a socket or a file descriptor. Every connection and the pseudo-terminal
get their own daemon thread; `stop()` wakes all of them through one self-pipe, so shutdown
does not wait for a poll timeout.
"""

from __future__ import annotations

import logging
import os
import re
import select
import socket
import threading
import tty
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

# (line without its terminator, too_long) -> reply bytes to send, or None for no reply.
# A too-long line is cut to the limit and passed once; the rest of it is discarded.
LineHandler = Callable[[bytes, bool], "bytes | None"]

_TERMINATOR = re.compile(rb"[\r\n]")
_Instrument = TypeVar("_Instrument", bound="ServedInstrument")
_READ_SIZE = 4096


class LineSplitter:
    """Splits a byte stream into lines; blank lines are dropped (CR LF yields one line)."""

    def __init__(self, max_line: int) -> None:
        self._max_line = max_line
        self._buffer = bytearray()
        self._discarding = False  # inside an overlong line, until its terminator arrives

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        lines: list[tuple[bytes, bool]] = []
        *complete, rest = _TERMINATOR.split(data)
        for piece in complete:
            self._take(piece, lines)
            if self._discarding:
                self._discarding = False
            elif self._buffer:
                lines.append((bytes(self._buffer), False))
            self._buffer.clear()
        self._take(rest, lines)
        return lines

    def _take(self, piece: bytes, lines: list[tuple[bytes, bool]]) -> None:
        if self._discarding:
            return
        self._buffer += piece
        if len(self._buffer) > self._max_line:
            lines.append((bytes(self._buffer[: self._max_line]), True))
            self._buffer.clear()
            self._discarding = True


def _call(handler: LineHandler, name: str, line: bytes, too_long: bool) -> bytes | None:
    """The handler's reply; a bug in it is logged and must not kill the transport thread."""
    try:
        return handler(line, too_long)
    except Exception:
        log.exception("%s: handler failed on %r", name, line[:80])
        return None


class _Waker:
    """A self-pipe: once `wake()` is called its read end stays readable for every select()."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()

    def wake(self) -> None:
        os.write(self._write_fd, b"x")

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self._write_fd)


class TcpLineServer:
    """Serves `handler` to any number of TCP clients, one thread per connection."""

    def __init__(
        self, name: str, host: str, port: int, handler: LineHandler, max_line: int
    ) -> None:
        self.name = name
        self._host = host
        self._port = port
        self._handler = handler
        self._max_line = max_line
        self._listener: socket.socket | None = None
        self._waker: _Waker | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []  # one per client connection
        self._threads_lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound; the port is the ephemeral one when 0 was asked for."""
        if self._listener is None:
            raise RuntimeError(f"{self.name}: TCP server not started")
        host, port = self._listener.getsockname()[:2]
        return host, port

    def start(self) -> None:
        self._listener = socket.create_server((self._host, self._port))
        self._waker = _Waker()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"{self.name}-accept", daemon=True
        )
        self._accept_thread.start()

    def stop(self) -> None:
        if self._listener is None or self._waker is None:
            return
        self._waker.wake()
        # The accept thread first: once it is gone no new connection thread can appear.
        if self._accept_thread is not None:
            self._accept_thread.join()
            self._accept_thread = None
        with self._threads_lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join()
        self._listener.close()
        self._waker.close()
        self._listener = None
        self._waker = None
        self._threads.clear()

    def _spawn(self, target: Callable[..., None], role: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=f"{self.name}-{role}", daemon=True)
        with self._threads_lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        listener, waker = self._listener, self._waker
        assert listener is not None and waker is not None
        while True:
            readable, _, _ = select.select([listener, waker.read_fd], [], [])
            if waker.read_fd in readable:
                return
            try:
                conn, peer = listener.accept()
            except OSError as exc:
                log.warning("%s: accept failed: %s", self.name, exc)
                continue
            log.info("%s: client %s connected", self.name, peer)
            self._spawn(self._serve, f"conn-{peer[1]}", conn, peer)

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        waker = self._waker
        assert waker is not None
        splitter = LineSplitter(self._max_line)
        # Sends time out so a client that never reads cannot hang the thread forever.
        conn.settimeout(5.0)
        with conn:
            while True:
                readable, _, _ = select.select([conn, waker.read_fd], [], [])
                if waker.read_fd in readable:
                    return
                try:
                    data = conn.recv(_READ_SIZE)
                except OSError as exc:
                    log.warning("%s: client %s: %s", self.name, peer, exc)
                    return
                if not data:
                    log.info("%s: client %s disconnected", self.name, peer)
                    return
                for line, too_long in splitter.feed(data):
                    reply = _call(self._handler, self.name, line, too_long)
                    if reply is None:
                        continue
                    try:
                        conn.sendall(reply)
                    except OSError as exc:
                        log.warning("%s: reply to %s lost: %s", self.name, peer, exc)
                        return


class PtyLineServer:
    """Serves `handler` on a pseudo-terminal: clients open `device` like a serial port.

    The server keeps the slave side open itself, so a client closing the device does not
    hang up the master (reads would fail with EIO) and the next client can open it again.
    Replies are written without blocking: a client that stops reading loses replies (counted
    in `replies_dropped_total`) rather than freezing the instrument.
    """

    def __init__(self, name: str, handler: LineHandler, max_line: int) -> None:
        self.name = name
        self._handler = handler
        self._max_line = max_line
        self._master: int | None = None
        self._slave: int | None = None
        self._waker: _Waker | None = None
        self._thread: threading.Thread | None = None
        self.device = ""
        self.replies_dropped_total = 0

    def start(self) -> None:
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no CR/LF translation: bytes pass as sent
        os.set_blocking(self._master, False)
        self.device = os.ttyname(self._slave)
        self._waker = _Waker()
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-pty", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None or self._waker is None:
            return
        self._waker.wake()
        self._thread.join()
        for fd in (self._master, self._slave):
            if fd is not None:
                os.close(fd)
        self._waker.close()
        self._master = self._slave = None
        self._waker = None
        self._thread = None

    def _loop(self) -> None:
        master, waker = self._master, self._waker
        assert master is not None and waker is not None
        splitter = LineSplitter(self._max_line)
        while True:
            readable, _, _ = select.select([master, waker.read_fd], [], [])
            if waker.read_fd in readable:
                return
            try:
                data = os.read(master, _READ_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                log.error("%s: pseudo-terminal read failed, stopping: %s", self.name, exc)
                return
            for line, too_long in splitter.feed(data):
                reply = _call(self._handler, self.name, line, too_long)
                if reply is not None:
                    self._write(master, reply)

    def _write(self, master: int, reply: bytes) -> None:
        view = memoryview(reply)
        try:
            while view:
                view = view[os.write(master, view) :]
        except OSError as exc:  # BlockingIOError: the client is not reading its replies
            self.replies_dropped_total += 1
            log.warning("%s: reply dropped (%s): %r", self.name, exc, reply[:80])


class ServedInstrument:
    """Base of a simulated instrument served on line servers: start/stop them together.

    Subclasses pass their servers (TCP first) and say how their endpoints read.
    """

    def __init__(self, tcp: TcpLineServer, pty: PtyLineServer | None = None) -> None:
        self._tcp = tcp
        self._pty = pty

    def start(self) -> None:
        try:
            self._tcp.start()
            if self._pty is not None:
                self._pty.start()
        except BaseException:
            self.stop()
            raise
        log.info("%s on %s", self._tcp.name, self.endpoints)

    def stop(self) -> None:
        self._tcp.stop()
        if self._pty is not None:
            self._pty.stop()

    def tcp_address(self) -> tuple[str, int]:
        """(host, port) a client on this machine connects to."""
        host, port = self._tcp.address
        return ("127.0.0.1" if host in ("0.0.0.0", "::") else host), port

    @property
    def endpoints(self) -> dict[str, str]:
        raise NotImplementedError

    def __enter__(self: _Instrument) -> _Instrument:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
