"""The wire between the daemon and its ingest process: record kinds, struct formats, names.

Both sides import this module and nothing else of each other, so what crosses the process
boundary is written down in one place. Messages are ZeroMQ multipart [kind, payload] over
ipc sockets in a private directory (mode 0700): both ends are this program, so a payload is
pickled, except the high-rate records, which are raw bytes (bias samples as
`records.BIAS_SAMPLE_DTYPE`, the rows of a generic time series as `series_dtype(name)`,
imaging watermarks as `WATERMARK_RECORD`). The stats names that the daemon's metrics mirror
(`DROP_REASONS`, `HDF5_WRITE_BUCKETS_S`) live here for the same reason.
"""

from __future__ import annotations

import struct

import numpy as np

from insitu_daq.runfile import layout

# daemon -> ingest, one ordered channel (a command is handled after every record sent before it)
CMD = b"cmd"  # {"op": ..., "id": ..., **arguments}, pickled
SAMPLES = b"samples"  # raw bytes of a BIAS_SAMPLE_DTYPE batch
EVENT = b"event"  # an Event, pickled; ingest -> daemon: Event.to_dict(), pickled
# [SERIES, name (UTF-8), rows]: rows of a time series declared in runfile/layout.py (a `Log`
# with a `record` name, e.g. the holder's position), raw bytes of series_dtype(name)
SERIES = b"series"
ANALYSIS = b"analysis"  # a live-analysis result: a JSON object (UTF-8), for the run file
IMAGING = b"imaging"  # an imaging.ImagingState as its to_message() JSON object (UTF-8)
IMAGING_WATERMARK = b"imaging_watermark"  # WATERMARK_RECORD: (run time s, states announced)

# ingest -> daemon
READY = b"ready"  # once, when its sockets are up: {"pid": ..., "error"?: ...}
REPLY = b"reply"  # {"id": ..., "ok": bool, ...}
STATS = b"stats"  # the stats dict, every STATS_INTERVAL_S
# once per run, when the run file stops taking writes: {"run_id", "kind", "reason", ...}
RECORDING_FAILED = b"recording_failed"

WATERMARK_RECORD = struct.Struct("<dq")

STATS_INTERVAL_S = 0.25

# Upper bounds (s) of the insitu_daq_hdf5_write_seconds histogram.
HDF5_WRITE_BUCKETS_S = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 1.0
)  # fmt: skip

# Why a received frame was not written (the keys of frames_dropped_by_reason).
DROP_REASONS = ("duplicate", "late", "stale_series", "geometry", "corrupt", "write_error")


def series_dtype(name: str) -> np.dtype:
    """The row dtype of the series `name` (time, then its log's columns); ValueError naming it
    if no log declares it."""
    declared = layout.SERIES.get(name)
    if declared is None:
        raise ValueError(f"unknown time series {name!r}; known: {', '.join(layout.SERIES)}")
    return np.dtype(declared.row_fields())


class IngestError(RuntimeError):
    """The ingest process refused a command, did not answer, or is not running."""
