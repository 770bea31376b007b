"""The ingest: DECTRIS Stream V2 in, the run file out (DESIGN.md, data flow). The design, and the
names other modules import. One job per module:
- wire.py: what crosses between the two processes (record kinds, formats, stats names);
- process.py: `IngestProcess`, the loop of the ingest process (commands, records, failure
  policy, counters, tap offers), and its entry point;
- recorder.py: `FrameRecorder`, the frame path into the file: rows, clock mapping, geometry;
- frames.py: geometry and chunks of a decoded image for the file (pure; the recorder's);
- client.py: `IngestClient`, the daemon's handle on it (core/worker.py `WorkerHandle`);
- tap.py: the frame tap offering each image to the live analysis (never blocking);
- counters.py: histogram and event rate limiter.

Two halves, two OS processes (DESIGN.md: "ingest+write and analysis in separate processes",
"one writer owns the run file"):

- `IngestProcess` runs in its own process (multiprocessing, "spawn": no fork of a threaded
  daemon). It owns the Stream2Receiver (PULL connected to `config.detector.endpoint`) and the
  RunWriter, and is the only thing that touches the run file. Its loop waits on the detector
  socket and the command socket together; per turn it first takes everything the daemon sent
  (commands and records, in order), then up to a batch of detector messages, then does the
  timed work (reorder-window expiry, clock retiming, flush, stats).
- `IngestClient` lives in the daemon. It starts the process and talks to it over two ZeroMQ
  ipc sockets in a private temporary directory (mode 0700, so only this user can connect;
  both ends are this program, so messages are pickled): one ordered channel daemon -> ingest
  for commands AND records (bias samples as raw bytes of `BIAS_SAMPLE_DTYPE`, events, holder
  positions, imaging states and watermarks), so `close_run` is handled after the last record
  sent before it; one channel ingest -> daemon for replies, stats (every `STATS_INTERVAL_S`)
  and events (to a callback).

The archive path moves bytes: a payload in the file's chunk format (bslz4 or lz4 as received,
or raw) goes to `write_direct_chunk` unchanged. With `detector.archive_compression = "none"`
compressed payloads are decompressed and stored raw. The frame datasets follow the stream:
a series whose geometry (channels, shape, pixel type, compression) is not the run's gets
datasets of its own when its first image arrives (RunWriter.stack_for: the empty datasets of
a run opened before the detector spoke are re-made; later geometries get
/entry/instrument/detector_<k>), recorded as a `file_layout` event (a SWMR reader reopens
the file then); only geometries beyond RunWriter's limit are refused (dropped, counted).
Each frame's imaging state (mode, pixel size, dose rate) is decided in the file by its own
time once the daemon's imaging watermark has passed it (`set_imaging`, `imaging_watermark`).

Frames pass the FrameSequencer (image_id order, gaps, duplicates, late and stale images,
ingest/sequence.py) and the DetectorClockMap (run-clock `frame_time` of the exposure midpoint).
All frames received are sequenced and timed, also with no run open or while not recording,
so the clock map of a running series is already good when a run starts; only frames received
while a run is open and recording are written. "Received while recording" is decided by the
frame's arrival stamp against the instants this process handled start/stop_recording (what
already reached the detector socket is taken before such a command). A run file that exists
is never overwritten.
As the clock envelope improves, the series' rows already in the file are retimed (at most
once per flush) so each series ends with one consistent mapping; frame_time never decreases.

It never dies on bad input: a malformed message, an image that does not fit the file, or an
exception while writing is counted, logged and reported as an event (rate-limited per kind),
and the loop goes on. A detector that stops sending while a run records is an `instrument` event
after `detector.silent_after_s`, and its return another (ingest/silence.py); a new series
in a run (a detector restarted or re-armed) is one too; a run closed because the daemon died
ends with an `error` event saying so. Payloads stay views into the received ZeroMQ frames (no
copy) from the socket to `write_direct_chunk` and the tap. The file is flushed at least every
`sampling.flush_interval_s`, so it survives a crash up to the last flush (SWMR). SIGINT is
ignored (the daemon handles Ctrl-C and then closes the run through this process); SIGTERM, or
the daemon's death, closes the run cleanly (after a grace period for SIGTERM, since the daemon
gets it too and still has a ramp-down to record).

Spawning imports the main module of the daemon again in the child: a script that starts an
IngestClient needs the usual `if __name__ == "__main__":` guard (the console script has it).

Stats (`IngestClient.stats()`): flat counters (`frames_received_total`,
`frames_written_total`, `frames_dropped_total`, `frames_missing_total`, `gaps_total`,
`malformed_total`, ...), `frames_dropped_by_reason`, `hdf5_write_seconds` as a Prometheus
histogram (`le` upper bounds, `cumulative_counts`, `sum`, `count`: one observation per write
call into HDF5), `hdf5_flush_seconds` (`sum`, `count`), `run` (the open run or None) and
`detector` (series, geometry, clock-mapping uncertainty), `analysis_offers_sent`,
`analysis_offers_skipped` (the analysis's queue was full), `analysis_offers_withheld` (the
ingest was behind: it has priority; the frame tap, ingest/tap.py) and
`analysis_last_offered_id` (the image_id of the last send tried, or None).
"""

from __future__ import annotations

from insitu_daq.ingest.client import RECORD_HWM, IngestClient
from insitu_daq.ingest.frames import (
    GeometryMismatchError,
    chunks_for_file,
    default_geometry,
    geometry_of_image,
    geometry_of_start,
)
from insitu_daq.ingest.process import IngestProcess, child_main
from insitu_daq.ingest.tap import AnalysisTap
from insitu_daq.ingest.wire import DROP_REASONS, HDF5_WRITE_BUCKETS_S, STATS_INTERVAL_S, IngestError

__all__ = [
    "DROP_REASONS",
    "HDF5_WRITE_BUCKETS_S",
    "RECORD_HWM",
    "STATS_INTERVAL_S",
    "AnalysisTap",
    "GeometryMismatchError",
    "IngestClient",
    "IngestError",
    "IngestProcess",
    "child_main",
    "chunks_for_file",
    "default_geometry",
    "geometry_of_image",
    "geometry_of_start",
]
