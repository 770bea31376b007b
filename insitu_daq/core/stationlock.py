"""One daemon per station: advisory locks on the exclusive resources a daemon or a `sim` uses.

Why. The detector's PUSH socket deals frames round-robin to every PULL connected to it: a
second daemon started for the same station (by mistake, by systemd while a hand-started one
runs) connects its ingest and takes every other frame from the running recording. Two
daemons on one source-meter fight over the bias. So a daemon takes a lock on every exclusive
resource it uses, first thing in `Daemon.start()`, before it starts its guardian, its ingest
or any socket; a second one is refused with one line naming the first (PID, endpoints).

What is locked (`daemon_resources`, `sim_resources`): the instruments a daemon connects to
(detector endpoint, source-meter VISA resource, holder port, microscope address) and the
ports it listens on (control, events, metrics). Names are normalised (VISA resource names
canonical, loopback host names one name, device paths with symlinks resolved), so two
different configs that share any one instrument also conflict. Listening ports are locked by
number whatever the interface (conservative: 127.0.0.1:5555 and 192.0.2.1:5555 conflict);
port 0 and "*" (pick a free one) lock nothing.

How. One lock file per resource in a lock folder (`lock_folder`), locked with flock(2). The
kernel drops the lock when the last descriptor of it closes, so a daemon that dies by SIGKILL
leaves no stale lock, and the files themselves are never removed (removing a lock file while
another process has it open would let two processes hold "the" lock). The holder writes JSON
into each file (pid, start time, config, endpoints) so that a refused process can name it.

Who holds what after the daemon. flock locks belong to the open file, so a child process
given the descriptor holds the lock too, until it exits. The daemon passes two on purpose:
the source-meter's lock to its bias guardian (a guardian that outlives a killed daemon keeps
the source-meter until it has ramped the bias down: a daemon started meanwhile is refused
instead of fighting it for the instrument) and the detector's lock to its ingest process (an
orphaned ingest stays connected to the detector until it has closed the run file). Every
other child gets none: the descriptors are close-on-exec, subprocess closes the others, and
multiprocessing's spawn passes only its own.

The lock folder: $INSITU_DAQ_LOCK_DIR, else the station config's `lock_dir`, else
/run/lock/insitu-daq, shared by every account (mode 1777, files 0666, like /run/lock itself),
so a daemon run by the systemd service and one started by hand see each other. Where that
folder cannot be made (a /run/lock only root may write), a per-account one is used, with a
warning: then daemons of other accounts are not seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import reduction
from pathlib import Path
from typing import Any

from insitu_daq.core.config import StationConfig

log = logging.getLogger(__name__)

LOCK_DIR_ENV = "INSITU_DAQ_LOCK_DIR"
SHARED_LOCK_DIR = Path("/run/lock/insitu-daq")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]", "ip6-localhost"})
INFO_READ_ATTEMPTS = 10  # the holder writes its JSON just after it locks: a refused reader
INFO_READ_PAUSE_S = 0.05  # may come in between; it reads again a few times
# What keeps a resource locked after its daemon has exited (see the module docstring).
KEPT_AFTER_EXIT = {
    "source-meter": "its bias guardian is making the bias safe (log: {guardian_log});"
    " start again once it has finished",
    "detector": "its ingest process is closing the run file; start again in a few seconds",
    "holder": "its guardian is switching the heating holder's heater off (log:"
    " {guardian_log}); start again once it has finished",
}
LEADS = {"daemon": "station already served by", "sim": "simulated station already running as"}


class StationLockError(RuntimeError):
    """The lock folder or a lock file cannot be used; the message is one line."""


class StationBusyError(StationLockError):
    """Another process serves a resource of this station; the message names it."""


@dataclass(frozen=True)
class Resource:
    """One exclusive resource: `kind` ("detector", "source-meter", "holder", "microscope",
    "port", "ipc") and its normalised `name`."""

    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"

    @property
    def file_name(self) -> str:
        """Readable but safe, and unique (the hash) whatever sanitising merged."""
        readable = re.sub(r"[^A-Za-z0-9.]+", "_", str(self)).strip("_")[:80]
        digest = hashlib.sha256(str(self).encode()).hexdigest()[:12]
        return f"{readable}.{digest}.lock"


# ----- what "the same station" means ----------------------------------------------------------
def _host(host: str) -> str:
    host = host.strip().lower()
    return "localhost" if host in LOOPBACK_NAMES else host.strip("[]")


def _tcp_address(address: str) -> str | None:
    """An address host:port normalised, or None if it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return f"{_host(host)}:{int(port)}"


def _connect_key(endpoint: str) -> str:
    """A ZeroMQ connect endpoint (tcp://host:port, ipc://path) normalised."""
    scheme, sep, address = endpoint.strip().partition("://")
    if not sep:
        return endpoint.strip()
    if scheme.lower() == "tcp":
        tcp = _tcp_address(address)
        return f"tcp://{tcp}" if tcp else endpoint.strip()
    if scheme.lower() == "ipc":
        return f"ipc://{os.path.abspath(address)}"
    return endpoint.strip()


def visa_key(resource: str) -> str:
    """A VISA resource name in canonical form (pyvisa's: board numbers, ::INSTR, case)."""
    from pyvisa import rname  # here: the ingest process imports this module, not pyvisa

    resource = resource.strip()
    # Upper case first (pyvisa reads a lower-case "::instr" as an address), but a serial
    # device path keeps its case.
    upper = resource.upper()
    for candidate in (resource, upper) if "/" in resource else (upper, resource):
        try:
            parsed = rname.parse_resource_name(candidate)
            break
        except rname.InvalidResourceName:
            continue
    else:
        return resource.upper()
    host = getattr(parsed, "host_address", None)
    if host is not None:
        return str(dataclasses.replace(parsed, host_address=_host(host)))  # type: ignore[type-var]
    board = str(getattr(parsed, "board", ""))
    if board.startswith("/"):  # ASRL/dev/ttyUSB0::INSTR
        return str(dataclasses.replace(parsed, board=os.path.realpath(board)))  # type: ignore[type-var]
    return str(parsed).upper()  # GPIB, USB (hex ids in either case)


def serial_key(port: str) -> str | None:
    """A pySerial port or URL normalised; None for loop:// (no device behind it)."""
    port = port.strip()
    scheme, sep, rest = port.partition("://")
    if not sep:
        return os.path.realpath(port)  # /dev/serial/by-id/... -> /dev/ttyUSB0
    scheme = scheme.lower()
    if scheme == "loop":
        return None
    address = rest.split("?", 1)[0].strip("/")
    tcp = _tcp_address(address)
    return f"{scheme}://{tcp or address}"


def _bind_resource(endpoint: str) -> Resource | None:
    """What a ZeroMQ bind endpoint occupies: its TCP port, or its ipc path; None for an
    ephemeral port ("*", 0) and inproc."""
    scheme, sep, address = endpoint.strip().partition("://")
    scheme = scheme.lower()
    if scheme == "tcp" and sep:
        port = address.rpartition(":")[2]
        return Resource("port", str(int(port))) if port.isdigit() and int(port) else None
    if scheme == "ipc" and sep:
        return Resource("ipc", os.path.abspath(address))
    return None


def _unique(resources: Iterable[Resource | None]) -> list[Resource]:
    return list(dict.fromkeys(r for r in resources if r is not None))


def daemon_resources(config: StationConfig) -> list[Resource]:
    """The exclusive resources of a daemon with this config, in the order they are locked."""
    meter = config.source_meter
    holder = serial_key(config.holder.port)
    microscope = _tcp_address(f"{config.microscope.host}:{config.microscope.port}")
    api = config.api
    return _unique(
        [
            Resource("detector", _connect_key(config.detector.endpoint)),
            # pyvisa-sim's instruments live inside each process: nothing to share.
            None
            if meter.visa_library.endswith("@sim")
            else Resource("source-meter", visa_key(meter.resource)),
            None if holder is None else Resource("holder", holder),
            Resource("microscope", f"tcp://{microscope}"),
            _bind_resource(api.control),
            _bind_resource(api.events),
            Resource("port", str(api.metrics_port)) if api.metrics_port else None,
        ]
    )


def sim_resources(ports: Iterable[int]) -> list[Resource]:
    """The ports a simulated station listens on (0: a free one, nothing to lock)."""
    return _unique(Resource("port", str(port)) if port else None for port in ports)


def daemon_owner(
    config: StationConfig,
    endpoints: Mapping[str, str],
    config_path: str | Path | None,
    guardian_log: Path | None = None,
) -> dict[str, Any]:
    """What a daemon's lock files say about it (JSON)."""
    return {
        "role": "daemon",
        "pid": os.getpid(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": None if config_path is None else str(Path(config_path).resolve()),
        "station": config.name,
        "endpoints": {**endpoints, "detector": config.detector.endpoint},
        "guardian_log": None if guardian_log is None else str(guardian_log),
    }


def sim_owner(endpoints: Mapping[str, str]) -> dict[str, Any]:
    """What a simulated station's lock files say about it (JSON)."""
    return {
        "role": "sim",
        "pid": os.getpid(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "endpoints": dict(endpoints),
    }


# ----- the lock folder ------------------------------------------------------------------------
def _private_folder() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "insitu-daq"
    return Path(tempfile.gettempdir()) / f"insitu-daq-{os.getuid()}"


def lock_folder(configured: Path | None = None) -> Path:
    """The folder of the lock files, created if needed (StationLockError if unusable)."""
    chosen = os.environ.get(LOCK_DIR_ENV) or configured
    if chosen:
        folder = Path(chosen)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StationLockError(f"lock folder {folder}: {exc.strerror}") from None
        return folder
    shared = SHARED_LOCK_DIR if SHARED_LOCK_DIR.parent.is_dir() else _shared_temp_folder()
    try:
        _make_shared(shared)
        return shared
    except OSError as exc:
        private = _private_folder()
        log.warning(
            "station locks in %s (cannot use %s: %s): a daemon of another account is not"
            " seen; set lock_dir in the station config to a folder every account can write",
            private, shared, exc.strerror,
        )  # fmt: skip
    try:
        private.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StationLockError(f"lock folder {private}: {exc.strerror}") from None
    return private


def _shared_temp_folder() -> Path:
    return Path(tempfile.gettempdir()) / "insitu-daq-locks"


def _make_shared(folder: Path) -> None:
    """A folder every account can create lock files in, sticky like /tmp (OSError if not)."""
    try:
        folder.mkdir()
    except FileExistsError:
        pass
    else:
        os.chmod(folder, 0o1777)  # mkdir's mode is cut by the umask
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode):  # a symlink planted in a world-writable /run/lock
        raise OSError(errno.ENOTDIR, "not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))


# ----- the locks ------------------------------------------------------------------------------
class StationLock:
    """Locks held on a station's resources; `release()` (or the process's end) frees them.

    `acquire` takes every lock or none: on the first resource another process holds, it
    releases what it took and raises StationBusyError naming that process.
    """

    def __init__(self, folder: Path, held: dict[Resource, int], owner: dict[str, Any]) -> None:
        self.folder = folder
        self._held = held
        self.owner = owner

    @classmethod
    def acquire(
        cls, resources: Iterable[Resource], owner: dict[str, Any], folder: Path | None = None
    ) -> StationLock:
        resources = list(resources)
        folder = lock_folder(folder) if resources else Path()
        lock = cls(folder, {}, owner)
        try:
            for resource in resources:
                lock._take(resource)
        except BaseException:
            lock.release()
            raise
        return lock

    @property
    def resources(self) -> list[Resource]:
        return list(self._held)

    def fd(self, kind: str) -> int | None:
        """The descriptor of the lock on this kind of resource (for a child that must keep
        it), or None if none is held."""
        return next((fd for r, fd in self._held.items() if r.kind == kind), None)

    def describe(self, **changes: Any) -> None:
        """Update what the lock files say about the holder (e.g. the endpoints as bound)."""
        self.owner = {**self.owner, **changes}
        for resource, fd in self._held.items():
            _write_info(fd, {**self.owner, "resource": str(resource)})

    def release(self) -> None:
        """Close this process's descriptors. Idempotent. A child that was given one keeps
        its lock until it exits."""
        held, self._held = self._held, {}
        for fd in held.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> StationLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _take(self, resource: Resource) -> None:
        path = self.folder / resource.file_name
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StationBusyError(refusal(resource, read_info(path))) from None
        except OSError as exc:
            os.close(fd)
            raise StationLockError(f"cannot lock {path}: {exc.strerror}") from None
        self._held[resource] = fd
        _write_info(fd, {**self.owner, "resource": str(resource)})


def _open_lock_file(path: Path) -> int:
    """Open (create) a lock file: close-on-exec, never through a symlink, never a file with
    other names (a hard link to something else planted in a shared folder)."""
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, os.O_RDWR | flags, 0o666)
    except PermissionError:  # another account's file it did not open to us: lock it read-only
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise StationLockError(f"cannot open lock file {path}: {exc.strerror}") from None
    except OSError as exc:
        raise StationLockError(f"cannot open lock file {path}: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise StationLockError(f"{path} is not a plain lock file: remove it")
    if info.st_uid == os.getuid():
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666)  # other accounts must be able to lock it too (see module doc)
    return fd


def _write_info(fd: int, info: dict[str, Any]) -> None:
    """Replace the file's JSON. pwrite: a child holding the same open file shares its offset."""
    data = json.dumps(info).encode() + b"\n"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:  # opened read-only (another account's file): the lock is what matters
        log.debug("cannot write who holds lock fd %d", fd)


def read_info(path: Path) -> dict[str, Any] | None:
    """The holder's JSON, or None if it cannot be read (yet)."""
    for attempt in range(INFO_READ_ATTEMPTS):
        try:
            info = json.loads(path.read_bytes())
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) and isinstance(info.get("pid"), int):
            return info
        if attempt + 1 < INFO_READ_ATTEMPTS:
            time.sleep(INFO_READ_PAUSE_S)
    return None


def _alive(pid: int) -> bool:
    """Running: neither gone nor a zombie (exited, its parent not told yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another account's process
        pass
    with contextlib.suppress(OSError, IndexError):  # Linux: the state after "(comm) "
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1] != "Z"
    return True


def refusal(resource: Resource, info: Mapping[str, Any] | None) -> str:
    """The one line a refused daemon or sim prints: who holds `resource` and where it is."""
    if info is None:
        return f"{resource} is in use by another process (its lock file says nothing more)"
    pid, role = info["pid"], info.get("role", "process")
    if not _alive(pid):
        after = KEPT_AFTER_EXIT.get(resource.kind, "a process it started still holds it")
        after = after.format(guardian_log=info.get("guardian_log") or "guardian.log")
        return f"{resource} still held after {role} PID {pid} exited: {after}"
    endpoints = info.get("endpoints") or {}
    where = ", ".join(f"{name} {address}" for name, address in endpoints.items())
    if info.get("config"):
        where = f"{where}; config {info['config']}" if where else f"config {info['config']}"
    lead = LEADS.get(role, "already in use by")
    return f"{lead} {role} PID {pid} ({where}): {resource} is in use"


# ----- handing a lock to a spawned child ------------------------------------------------------
class InheritedFd:
    """A descriptor a multiprocessing "spawn" child receives (and so keeps open, and locked,
    for its whole life). Pickled through multiprocessing.reduction.DupFd, the way
    multiprocessing hands sockets and pipes to the processes it spawns."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _rebuild_inherited_fd, (reduction.DupFd(self.fd),)


def _rebuild_inherited_fd(dup: Any) -> InheritedFd:
    return InheritedFd(dup.detach())
