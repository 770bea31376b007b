"""Station locks (insitu_daq/core/stationlock.py): what "the same station" is, and who holds a
lock.

Real flock(2) locks on real files in the session's lock folder (conftest.py), held by this
process or by real child processes that are killed with SIGKILL; no instrument is needed:
the locks are taken before any is touched.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from insitu_daq.core import stationlock
from insitu_daq.core.config import ConfigError, StationConfig, parse_config
from insitu_daq.core.stationlock import (
    LOCK_DIR_ENV,
    InheritedFd,
    Resource,
    StationBusyError,
    StationLock,
    StationLockError,
    daemon_owner,
    daemon_resources,
    sim_resources,
)

# A process that locks a station, says so, then starts `sleep` (inheriting every descriptor
# it is allowed to) and waits: the test kills it and looks at who keeps the lock.
HOLDER = """
import subprocess, sys, time
from insitu_daq.core.config import StationConfig
from insitu_daq.core.stationlock import StationLock, daemon_owner, daemon_resources

config = StationConfig.model_validate_json(sys.argv[1])
lock = StationLock.acquire(daemon_resources(config), daemon_owner(config, {}, None))
child = subprocess.Popen(["sleep", "60"], close_fds=False)  # as careless as a child can be
print("locked", child.pid, flush=True)
time.sleep(60)
"""


def _config(**sections: dict) -> StationConfig:
    """A station on this machine's loopback, with every exclusive resource its own."""
    base = {
        "source_meter": {"resource": "TCPIP::127.0.0.1::45025::SOCKET"},
        "holder": {"port": "socket://127.0.0.1:45026"},
        "microscope": {"port": 45027},
        "detector": {"endpoint": "tcp://127.0.0.1:45031"},
        "api": {
            "control": "tcp://127.0.0.1:45555",
            "events": "tcp://127.0.0.1:45556",
            "metrics_port": 45105,
        },
    }
    for name, values in sections.items():
        base[name] = {**base[name], **values}
    return parse_config(base)


def _other_station() -> StationConfig:
    """Another station on the same machine: nothing in common with _config()."""
    return _config(
        source_meter={"resource": "GPIB0::24::INSTR"},
        holder={"port": "socket://127.0.0.1:46026"},
        microscope={"port": 46027},
        detector={"endpoint": "tcp://127.0.0.1:46031"},
        api={
            "control": "tcp://127.0.0.1:46555",
            "events": "tcp://127.0.0.1:46556",
            "metrics_port": 46105,
        },
    )


def _lock(config: StationConfig) -> StationLock:
    return StationLock.acquire(daemon_resources(config), daemon_owner(config, {}, None))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize(
    ("section", "key", "one", "other", "kind"),
    [
        # The same instrument under two spellings of its address.
        ("source_meter", "resource", "TCPIP::localhost::45025::SOCKET",
         "TCPIP0::127.0.0.1::45025::SOCKET", "source-meter"),
        ("source_meter", "resource", "GPIB::24", "gpib0::24::instr", "source-meter"),
        ("holder", "port", "socket://LOCALHOST:45026", "socket://127.0.0.1:45026", "holder"),
        ("detector", "endpoint", "tcp://localhost:45031", "tcp://127.0.0.1:45031", "detector"),
        # One TCP port, whichever service listens on it.
        ("api", "metrics_port", 45555, 45555, "port"),
    ],
)  # fmt: skip
def test_configs_sharing_any_one_resource_are_the_same_station(
    section: str, key: str, one: object, other: object, kind: str
) -> None:
    first = _other_station().model_copy(
        update={section: getattr(_other_station(), section).model_copy(update={key: one})}
    )
    # For "api": the second's control port is the first's metrics port.
    second = _config() if section == "api" else _config(**{section: {key: other}})
    with _lock(first), pytest.raises(StationBusyError) as refused:
        _lock(second)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"station already served by daemon PID {os.getpid()} (")
    assert message.endswith(f": {kind} {_canonical(second, kind)} is in use")
    # Refused means nothing kept: the station is free once the first one lets go.
    _lock(second).release()


def _canonical(config: StationConfig, kind: str) -> str:
    return next(r.name for r in daemon_resources(config) if r.kind == kind)


def test_a_daemon_serial_port_is_its_device_whatever_the_link(tmp_path: Path) -> None:
    device = tmp_path / "ttyUSB0"
    device.touch()
    by_id = tmp_path / "usb-FTDI_holder-if00-port0"
    by_id.symlink_to(device)
    first = _other_station().model_copy(
        update={"holder": _other_station().holder.model_copy(update={"port": str(by_id)})}
    )
    with _lock(first), pytest.raises(StationBusyError, match=f"holder {device} is in use"):
        _lock(_config(holder={"port": str(device)}))


def test_two_stations_on_one_machine_and_ephemeral_ports_do_not_conflict() -> None:
    ephemeral = {"control": "tcp://127.0.0.1:*", "events": "tcp://127.0.0.1:0", "metrics_port": 0}
    first = _config(api=ephemeral)
    second = _other_station().model_copy(
        update={"api": _other_station().api.model_copy(update=ephemeral)}
    )
    with _lock(first) as one, _lock(second) as two:
        assert {r.kind for r in one.resources} == {"detector", "source-meter", "holder",
                                                   "microscope"}  # fmt: skip
        assert not set(one.resources) & set(two.resources)
    assert sim_resources([0, 0, 0, 0]) == []
    assert sim_resources([5025, 0, 5025]) == [Resource("port", "5025")]


def test_a_sim_and_a_daemon_conflict_only_on_a_port_both_listen_on() -> None:
    config = _config()
    sim_ports = [45025, 45026, 45027, 45031]  # what the daemon connects to: no conflict
    with (
        _lock(config),
        StationLock.acquire(sim_resources(sim_ports), {"role": "sim", "pid": os.getpid()}),
        pytest.raises(StationBusyError, match="port 45555 is in use"),
    ):
        StationLock.acquire(sim_resources([45555]), {"role": "sim", "pid": os.getpid()})


def test_the_refusal_names_the_holder_its_endpoints_and_config(tmp_path: Path) -> None:
    config = _config()
    endpoints = {"control": "tcp://127.0.0.1:45555", "events": "tcp://127.0.0.1:45556",
                 "metrics": "http://127.0.0.1:45105/metrics"}  # fmt: skip
    owner = daemon_owner(config, endpoints, tmp_path / "station.toml")
    with (
        StationLock.acquire(daemon_resources(config), owner),
        pytest.raises(StationBusyError) as refused,
    ):
        _lock(config)
    assert str(refused.value) == (
        f"station already served by daemon PID {os.getpid()} (control tcp://127.0.0.1:45555,"
        " events tcp://127.0.0.1:45556, metrics http://127.0.0.1:45105/metrics,"
        f" detector tcp://127.0.0.1:45031; config {tmp_path / 'station.toml'}):"
        " detector tcp://localhost:45031 is in use"
    )


def test_the_kernel_frees_the_locks_of_a_killed_holder_not_its_children() -> None:
    config = _config()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, config.model_dump_json()],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # the session's lock folder too
    )
    sleeper = None
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line.startswith("locked"), line
        sleeper = int(line.split()[1])
        with pytest.raises(StationBusyError, match=f"daemon PID {holder.pid} "):
            _lock(config)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        # `sleep` lives on with every descriptor it could inherit: the locks are
        # close-on-exec, so it holds none of them.
        assert not _gone(sleeper)
        _lock(config).release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()  # type: ignore[union-attr]
        if sleeper is not None and not _gone(sleeper):
            os.kill(sleeper, signal.SIGKILL)


def _keep(fds: tuple[InheritedFd, ...], ready: Any) -> None:
    ready.set()
    time.sleep(60)


def test_a_spawned_child_given_a_lock_keeps_it_until_it_exits() -> None:
    """What the daemon's ingest process does with the detector's lock."""
    config = _config()
    lock = _lock(config)
    detector = lock.fd("detector")
    assert detector is not None and not os.get_inheritable(detector)
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    child = context.Process(target=_keep, args=((InheritedFd(detector),), ready), daemon=True)
    child.start()
    try:
        assert ready.wait(30)
        lock.release()  # as a killed daemon's descriptors are closed
        with pytest.raises(StationBusyError, match="detector tcp://localhost:45031 is in use"):
            _lock(config)
        _lock(_config(detector={"endpoint": "tcp://127.0.0.1:47031"})).release()  # only it
    finally:
        child.kill()
        child.join()
    _lock(config).release()


def test_a_planted_link_is_never_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock folder others may write to (/run/lock/insitu-daq): a daemon run as root must
    not truncate whatever a link planted there points to."""
    folder = tmp_path / "locks"
    folder.mkdir()
    monkeypatch.setenv(LOCK_DIR_ENV, str(folder))
    config = _config()
    victim = tmp_path / "precious"
    victim.write_text("keep me")
    detector, source_meter = daemon_resources(config)[:2]
    (folder / detector.file_name).symlink_to(victim)
    with pytest.raises(StationLockError, match=r"^cannot open lock file .*: Too many levels"):
        _lock(config)
    os.link(victim, folder / source_meter.file_name)  # a hard link: the same file
    (folder / detector.file_name).unlink()
    with pytest.raises(StationLockError, match="is not a plain lock file"):
        _lock(config)
    assert victim.read_text() == "keep me"


def test_lock_dir_must_be_absolute() -> None:
    with pytest.raises(ConfigError, match=r"^lock_dir: 'locks' is not an absolute path$"):
        parse_config({"lock_dir": "locks"})
    assert parse_config({"lock_dir": "/run/insitu-daq"}).lock_dir == Path("/run/insitu-daq")


def test_the_default_lock_folder_is_shared_by_every_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/run/lock/insitu-daq by default (here a stand-in for it): a daemon run by the systemd
    service's account and one started by hand by an operator must see each other's locks."""
    monkeypatch.delenv(LOCK_DIR_ENV)
    shared = tmp_path / "run-lock" / "insitu-daq"
    shared.parent.mkdir()
    monkeypatch.setattr(stationlock, "SHARED_LOCK_DIR", shared)
    with _lock(_config()) as lock:
        assert lock.folder == shared
        assert stat.S_IMODE(shared.stat().st_mode) == 0o1777  # sticky, like /tmp
        assert {stat.S_IMODE(f.stat().st_mode) for f in shared.iterdir()} == {0o666}
    # The station's config may name another (every daemon of the station reads it).
    configured = _config().model_copy(update={"lock_dir": tmp_path / "station-locks"})
    with StationLock.acquire(daemon_resources(configured), {}, configured.lock_dir) as lock:
        assert lock.folder == tmp_path / "station-locks"


def test_a_link_planted_for_the_shared_folder_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(LOCK_DIR_ENV)
    shared = tmp_path / "run-lock" / "insitu-daq"
    shared.parent.mkdir()
    (tmp_path / "elsewhere").mkdir()
    shared.symlink_to(tmp_path / "elsewhere")
    monkeypatch.setattr(stationlock, "SHARED_LOCK_DIR", shared)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "runtime"))
    with _lock(_config()) as lock:
        assert lock.folder == tmp_path / "runtime" / "insitu-daq"  # this account's own
    assert not list((tmp_path / "elsewhere").iterdir())
    assert "a daemon of another account is not seen" in caplog.text
