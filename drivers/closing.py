"""`with driver:` for the instrument drivers: one small base class instead of a copy each.

A driver holds an open connection (a VISA session, a serial port, a socket); `close()` gives
it back. Used as a context manager, it is closed however the block ends.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class ClosedOnExit:
    """Base for a driver with a `close()`: `with Driver(...) as d:` closes it at the end."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
