"""What every spawned worker process of the daemon (ingest, live analysis) does first."""

from __future__ import annotations

import logging
import signal


def start_worker_process(name: str, log_level: int) -> None:
    """Leave Ctrl-C to the daemon (it stops its workers in order) and log as `name[pid]`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
