"""Real small file systems for the recording-failure tests: a tmpfs that fills, an ext4 image
that the kernel turns read-only. Mounting needs root: without it (or without the tools, or
in a container that forbids mounts) the test is skipped and says why.

Why ext4 for "read-only mid-run": `mount -o remount,ro` is refused (EBUSY) while a file on the
file system is open for writing, which the run file is; a disk that goes read-only under a
running program is the kernel's emergency read-only after a file-system error
(errors=remount-ro), which ext4 can be told to raise (/sys/fs/ext4/<dev>/trigger_fs_error).
A disk that stops answering (EIO) is ext4's shutdown ioctl.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
_EXT4_GOING_FLAGS_NOLOGFLUSH = 0x2


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (mount); not root, so not tested here")


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def unmount(path: Path, patience_s: float = 10.0) -> None:
    """Unmount, waiting for processes that still hold it to let go (a daemon's guardian stops
    just after it), else detach it all the same."""
    deadline = time.monotonic() + patience_s
    while _run("umount", str(path)).returncode != 0:
        if time.monotonic() > deadline:
            _run("umount", "-l", str(path))
            return
        time.sleep(0.2)


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of `size_bytes` mounted at `path` (made), unmounted on the way out."""
    _need_root("a tmpfs of a given size")
    path.mkdir(parents=True, exist_ok=True)
    mounted = _run("mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        unmount(path)


@contextlib.contextmanager
def read_only_view(folder: Path) -> Iterator[Path]:
    """`folder` made read-only in place (a read-only bind mount over it), as an administrator
    would; files already open for writing under it (the guardian's log) keep their mount."""
    _need_root("a read-only bind mount")
    bound = _run("mount", "--bind", str(folder), str(folder))
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount: {bound.stderr.strip()}")
    try:
        result = _run("mount", "-o", "remount,bind,ro", str(folder))
        assert result.returncode == 0, result.stderr
        yield folder
    finally:
        unmount(folder)


@contextlib.contextmanager
def ext4(path: Path, image: Path, size_bytes: int) -> Iterator[str]:
    """An ext4 image on a loop device, mounted errors=remount-ro at `path` (journal committed
    every second); yields the
    device's name (e.g. "loop3") for `make_read_only`."""
    _need_root("an ext4 loop mount")
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 not installed")
    path.mkdir(parents=True, exist_ok=True)
    with image.open("wb") as f:
        f.truncate(size_bytes)
    made = _run("mkfs.ext4", "-q", "-F", str(image))
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    # commit=1: the journal commits every second (default 5), so what a test wrote a couple
    # of seconds before a fault is on the disk.
    mounted = _run("mount", "-o", "loop,errors=remount-ro,commit=1", str(image), str(path))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount an ext4 image on a loop device: {mounted.stderr.strip()}")
    try:
        device = _run("findmnt", "-no", "SOURCE", str(path)).stdout.strip()
        yield os.path.basename(device)
    finally:
        unmount(path)  # a loop mount's device is released with it (autoclear)
        image.unlink(missing_ok=True)


def make_read_only(device: str) -> None:
    """The kernel's emergency read-only on an ext4 file system, as after a disk error."""
    trigger = Path(f"/sys/fs/ext4/{device}/trigger_fs_error")
    if not trigger.exists():
        pytest.skip(f"{trigger} not there: this kernel cannot be told to raise an ext4 error")
    trigger.write_text("1\n")


def shut_down(path: Path) -> None:
    """ext4's shutdown (EXT4_IOC_SHUTDOWN, no log flush): every later read and write of the
    file system fails with EIO, as on a disk that stopped answering."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, _EXT4_IOC_SHUTDOWN, struct.pack("I", _EXT4_GOING_FLAGS_NOLOGFLUSH))
    finally:
        os.close(fd)


def mount_again(path: Path, image: Path) -> None:
    """Unmount the image and mount it again: what its disk really kept (the journal
    replayed, as at the next boot)."""
    unmount(path)
    mounted = _run("mount", "-o", "loop", str(image), str(path))
    assert mounted.returncode == 0, mounted.stderr


def fill(folder: Path) -> Path:
    """Write a file into `folder` until its file system is full (ENOSPC); returns it."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 1 << 12):  # then page by page: up to the last free page
            block = bytes(size)
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler
