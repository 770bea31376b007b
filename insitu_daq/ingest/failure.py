"""When the run file cannot be written: what went wrong, in words an operator acts on.

The ingest process (ingest/process.py) hands every exception of a run-file write to
`classify_write_error`. An exception that carries an errno is a recording failure: the disk or
folder will not take the run any more, and the daemon must not go on biasing a particle with
nothing recorded. h5py does not always raise OSError: an HDF5 error (e.g. a failed flush)
comes as RuntimeError whose text holds the system's `errno = N`, so the cause chain and the
text are both looked at. An exception without an errno (a bug, a malformed record) is not
classified here: the caller counts it as before.

`SpaceReserve` keeps a little space on the data disk for the end of a run: HDF5 needs to write
metadata to close a file, and a file closed on a full disk is left unreadable ("len not
positive after adjustment for EOA"). The reserve is a preallocated file next to the run file;
it is removed when the recording fails, so the failure event, the last flush and the close
fit in the space it held. Measured on a full tmpfs: without it the file did not open again;
with it, every frame written before the failure and the event were readable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Space kept free for the end of a run (failure event, last flush, close). HDF5 writes the
# pending per-frame columns (<= 64 frames), the per-frame bias and its metadata cache at close:
# tens of kilobytes in the tests, so 1 MiB is ample and nothing on a data disk.
RESERVE_BYTES = 1 << 20

KINDS = ("disk_full", "read_only", "folder_gone", "write_error")
_KIND_OF_ERRNO = {
    errno.ENOSPC: "disk_full",
    errno.EDQUOT: "disk_full",
    errno.EROFS: "read_only",
    errno.EACCES: "read_only",
    errno.EPERM: "read_only",
    errno.ENOENT: "folder_gone",
    errno.ENOTDIR: "folder_gone",
    errno.ESTALE: "folder_gone",
}
_HDF5_ERRNO = re.compile(r"\berrno = (\d+)")


@dataclass(frozen=True)
class RecordingFailure:
    """Why the run file cannot be written. `reason` is one line: `disk full in /data (...)`."""

    kind: str  # one of KINDS
    reason: str
    errno: int | None = None


def headline(kind: str, directory: Path) -> str:
    """The first words of a failure's reason, naming the folder."""
    if kind == "disk_full":
        return f"disk full in {directory}"
    if kind == "read_only":
        return f"data folder {directory} is read-only"
    if kind == "folder_gone":
        return f"data folder {directory} is gone"
    return f"write error in {directory}"


def error_number(exc: BaseException) -> int | None:
    """The errno behind an exception: its own, one in its cause chain, or an HDF5 message's."""
    for link in _chain(exc):
        number = getattr(link, "errno", None)
        if isinstance(number, int) and number > 0:
            return number
    for link in _chain(exc):
        found = _HDF5_ERRNO.search(str(link))
        if found and int(found[1]) > 0:
            return int(found[1])
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def describe_errno(number: int) -> str:
    """`ENOSPC: No space left on device`."""
    return f"{errno.errorcode.get(number, f'errno {number}')}: {os.strerror(number)}"


def classify_write_error(
    exc: BaseException, run_file: Path, context: str
) -> RecordingFailure | None:
    """The recording failure an exception of a run-file write is, or None (not an I/O error).

    `context` says what was being written and what the file keeps, for the reason's
    parenthesis: `disk full in /data (ENOSPC: No space left on device; <context>)`.
    """
    number = error_number(exc)
    if number is None:
        return None
    kind = _KIND_OF_ERRNO.get(number, "write_error")
    reason = f"{headline(kind, run_file.parent)} ({describe_errno(number)}; {context})"
    return RecordingFailure(kind, reason, number)


def file_moved(run_file: Path, identity: tuple[int, int], context: str) -> RecordingFailure | None:
    """A failure if the run file is no longer at its path (deleted, or its folder removed).

    Writes into an open file whose folder was removed still succeed (the inode lives on until
    closed), so nothing else would notice: the recording would go to a file no one can open.
    `identity`: (st_dev, st_ino) of the file when it was opened.
    """
    try:
        stat = os.stat(run_file)
    except (FileNotFoundError, NotADirectoryError):
        pass
    else:
        if (stat.st_dev, stat.st_ino) == identity:
            return None
    if run_file.parent.is_dir():
        reason = f"run file {run_file} was deleted or replaced ({context})"
    else:
        reason = f"{headline('folder_gone', run_file.parent)} ({context})"
    return RecordingFailure("folder_gone", reason, errno.ENOENT)


def file_identity(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


class SpaceReserve:
    """A preallocated file holding `size` bytes of the data disk until `release()`.

    Raises OSError (e.g. ENOSPC) if the space is not there to take.
    """

    def __init__(self, path: Path, size: int = RESERVE_BYTES) -> None:
        self.path = Path(path)
        self.size = size
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.pwrite(fd, bytes(size), 0)  # a file system without fallocate: real blocks
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise
        os.close(fd)
        self.held = True

    def release(self) -> int:
        """Give the space back (idempotent); the bytes freed (0 if already released or gone)."""
        if not self.held:
            return 0
        self.held = False
        try:
            os.unlink(self.path)
        except OSError:  # gone with its folder, or on a file system now read-only
            return 0
        return self.size


def reserve_path(run_file: Path) -> Path:
    """Where a run file's reserve lives: hidden, next to it."""
    return run_file.with_name(f".{run_file.name}.reserve")
