"""Frame-to-bias alignment: the per-frame bias in the run file against the simulator's truth.

What it measures. The simulated source-meter and the live camera (rendering the shared model at
40 frames/s, 1024 x 1024 bslz4) run in another process on one model, with the tip in contact.
This process is the daemon's side: the real BiasController ramps the bias 0 -> 2 V -> 0 at the
maximum rate (limits.max_ramp_rate_volts_per_s, 1 V/s), a few times, while the real ingest
process records the run. Then each frame's `bias_voltage` in the file (the commanded level
at its `frame_time`, from the stamped level changes, plus the measured offset: runfile/framebias.py)
is compared with the bias the model applied at that frame's
exposure midpoint (the camera's `truth.bias_volts`, recorded as each image is built).

Figures: median and p99 of |file - truth| over the frames taken while the bias moved (and over
all frames), in volts and as time (error / ramp rate). Target: median <= 2 ms. To say where an
error comes from, three parts are measured separately:
  - frame timing: file `frame_time` minus the true capture instant (run clock);
  - bias log: each logged sample against the model's bias at the sample's time stamp;
  - sampling: the truth staircase (the source steps `limits.ramp_step_volts` at a time)
    sampled at the log's instants and interpolated at the true frame instants, i.e. the error
    of a perfect log at this sampling rate.

Run:
    /tmp/v/bin/python bench/bench_alignment.py [--cycles 3] [--volts 2] [--rate 50]
        [--step 0.01] [--content hrtem|lm]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
from simproc import ImageTruth, StationProcess

from insitu_daq.control.bias import BiasController
from insitu_daq.core.clock import RunClock
from insitu_daq.core.config import (
    DetectorConfig,
    SafetyLimits,
    SamplingConfig,
    SourceMeterConfig,
    StationConfig,
)
from insitu_daq.core.records import Event
from insitu_daq.ingest import IngestClient
from insitu_daq.runfile.writer import RunMetadata

BASELINE_S = 1.0  # at each end of a ramp, so every ramp has frames before and after it
EXPOSURE_S = 0.025  # the camera's count time at 40 frames/s (less 100 ns)


class Forward:
    """The daemon's sample path: bias samples into the run file."""

    def __init__(self) -> None:
        self.ingest: IngestClient | None = None
        self.lock = threading.Lock()

    def on_samples(self, batch: np.ndarray) -> None:
        ingest = self.ingest
        if ingest is not None:
            ingest.write_samples(batch)

    def on_event(self, event: Event) -> None:
        pass


def staircase(history: list[tuple[float, float]], model_times: np.ndarray) -> np.ndarray:
    """The model's applied bias (piecewise constant between changes) at `model_times`."""
    times = np.array([t for t, _ in history])
    values = np.array([v for _, v in history])
    index = np.searchsorted(times, model_times, side="right") - 1
    return values[np.clip(index, 0, len(values) - 1)]


def achieved_ramp(history: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Mean rate of the ramps in the model's bias history (first step to last step of each),
    and the median and p99 time between the steps of a ramp (s)."""
    times = np.array([t for t, _ in history])
    values = np.array([v for _, v in history])
    gaps = np.diff(times)
    plateau = np.flatnonzero(gaps > 0.5)  # the BASELINE_S holds between the ramps
    rates, steps, start = [], [], 0
    for end in [*plateau, len(times) - 1]:
        first = start + 1  # the first change of this ramp
        if end > first:
            rates.append(abs(values[end] - values[start]) / (times[end] - times[first]))
            steps.extend(np.diff(times[first : end + 1]))
        start = end
    if not rates:
        return float("nan"), float("nan"), float("nan")
    return float(np.mean(rates)), float(np.median(steps)), float(np.percentile(steps, 99))


def percentiles(values: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=3, help="ramps up and down")
    parser.add_argument("--volts", type=float, default=2.0, help="top of the ramp")
    parser.add_argument("--rate", type=float, default=50.0, help="bias sampling rate (Hz)")
    parser.add_argument("--step", type=float, default=0.01, help="limits.ramp_step_volts")
    parser.add_argument("--content", choices=("lm", "hrtem"), default="hrtem")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the run file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    limits = SafetyLimits(ramp_step_volts=args.step)
    ramp_rate = limits.max_ramp_rate_volts_per_s
    folder = Path(tempfile.mkdtemp(prefix="bench_alignment_", dir=args.dir))
    path = folder / "run.h5"
    forward = Forward()
    print(f"bench_alignment: {args.cycles} x (0 -> {args.volts:g} -> 0 V) at {ramp_rate:g} V/s"
          f" in {args.step * 1e3:g} mV steps, bias sampled at {args.rate:g} Hz, camera 40"
          f" frames/s 1024x1024 {args.content} bslz4, tip in contact")  # fmt: skip
    try:
        with StationProcess(camera_mode="render", content=args.content) as station:
            config = StationConfig(
                data_dir=folder,
                source_meter=SourceMeterConfig(resource=station.endpoints["visa"]),
                detector=DetectorConfig(endpoint=station.endpoints["stream2"]),
                sampling=SamplingConfig(bias_rate_hz=args.rate),
                limits=limits,
            )
            clock = RunClock()
            bias = BiasController(config, clock, forward.on_samples, forward.on_event)
            ingest = IngestClient(config, clock=clock)
            ingest.start()
            try:
                bias.start()
                station.call("arm")
                meta = RunMetadata("bench_alignment", "alignment", clock.start_ns)
                ingest.open_run(meta, path, clock=clock)
                forward.ingest = ingest
                ingest.start_recording()
                time.sleep(BASELINE_S)
                for _ in range(args.cycles):
                    bias.ramp_to(args.volts)
                    time.sleep(BASELINE_S)
                    bias.ramp_to(0.0)
                    time.sleep(BASELINE_S)
                ingest.stop_recording()
                bias.output_off()
                time.sleep(0.2)
                summary = ingest.close_run()
                forward.ingest = None
            finally:
                bias.stop()
                ingest.stop()
            station.call("disarm")
            truths: list[ImageTruth] = station.call("truth")
            history = station.call("bias_history")
            counters = station.call("counters")
            model_t0 = station.model_t0_monotonic
        report(path, truths, history, model_t0, clock, ramp_rate, summary, counters)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def report(
    path: Path,
    truths: list[ImageTruth],
    history: list[tuple[float, float]],
    model_t0: float,
    clock: RunClock,
    ramp_rate: float,
    summary: dict,
    counters: dict,
) -> None:
    run_t0 = clock.start_monotonic_ns * 1e-9  # monotonic s at run time 0 (time scale 1)
    with h5py.File(path, "r") as f:
        detector = f["/entry/instrument/detector"]
        image_id = detector["image_id"][:]
        series_id = detector["series_id"][:]
        frame_time = detector["frame_time"][:]
        frame_bias = detector["bias_voltage"][:]
        sample_time = f["/entry/sample/bias_voltage/time"][:]
        sample_volts = f["/entry/sample/bias_voltage/value"][:]
    truth_by_id = {(t.series_id, t.image_id): t for t in truths}
    rows = [i for i in range(len(image_id)) if (series_id[i], image_id[i]) in truth_by_id]
    matched = [truth_by_id[(series_id[i], image_id[i])] for i in rows]
    truth_bias = np.array([t.bias_volts for t in matched])
    truth_time = np.array([t.capture_monotonic for t in matched]) - run_t0
    file_bias = frame_bias[rows]
    file_time = frame_time[rows]
    error = file_bias - truth_bias
    # Frames whose exposure saw the bias move: the truth differs from a neighbour's.
    moving = np.zeros(len(truth_bias), dtype=bool)
    changes = np.flatnonzero(np.diff(truth_bias) != 0)
    moving[changes] = moving[changes + 1] = True

    # The parts: frame timing, the bias log, and sampling a staircase at the log's rate.
    timing_error = file_time - truth_time
    sample_truth = staircase(history, sample_time + run_t0 - model_t0)
    log_error = sample_volts - sample_truth
    sample_moving = np.abs(np.gradient(sample_truth)) > 0
    perfect_log = np.interp(truth_time, sample_time, sample_truth)
    sampling_error = perfect_log - truth_bias
    # The bias averaged over each exposure (what the frame integrated), against the file.
    offsets = np.linspace(-EXPOSURE_S / 2, EXPOSURE_S / 2, 51)
    exposure_truth = staircase(
        history, (truth_time + run_t0 - model_t0)[:, None] + offsets[None, :]
    ).mean(axis=1)
    exposure_error = file_bias - exposure_truth
    achieved, step_p50, step_p99 = achieved_ramp(history)

    print(f"frames: {len(image_id)} in the file ({summary.get('frames_dropped')} dropped,"
          f" {summary.get('frames_missing')} missing), {len(rows)} matched to the truth of"
          f" {len(truths)} images sent ({counters.get('frames_late_total')} late);"
          f" {int(moving.sum())} while the bias moved; {len(sample_time)} bias samples"
          )  # fmt: skip
    step = abs(np.diff([v for _, v in history])).max()
    print(f"ramp: {ramp_rate:g} V/s asked, {achieved:.3f} V/s achieved (model's bias history);"
          f" steps of {step * 1e3:.3g} mV every {step_p50 * 1e3:.1f} ms median,"
          f" {step_p99 * 1e3:.1f} ms p99 (asked {step / ramp_rate * 1e3:.1f} ms)")  # fmt: skip
    print(f"as time: error / achieved rate ({1e-3 / achieved * 1e3:.2f} ms per mV)")
    print("                                              median        p99       max")
    for name, values in (
        ("|file - truth| bias, frames while moving", np.abs(error[moving])),
        ("|file - truth| bias, all frames", np.abs(error)),
        ("|file - exposure-mean bias|, while moving", np.abs(exposure_error[moving])),
    ):
        p50, p99 = percentiles(values)
        print(f"{name:<44s} {p50 * 1e3:7.2f} mV {p99 * 1e3:7.2f} mV {values.max() * 1e3:6.2f} mV")
        as_ms = 1e3 / achieved
        print(f"{'   as time':<44s} {p50 * as_ms:7.2f} ms"
              f" {p99 * as_ms:7.2f} ms {values.max() * as_ms:6.2f} ms")  # fmt: skip
    print("parts:")
    for name, values, scale, unit in (
        ("frame_time - true capture instant", timing_error, 1e3, "ms"),
        ("|frame_time error|", np.abs(timing_error), 1e3, "ms"),
        ("|bias log - truth at stamp|, moving", np.abs(log_error[sample_moving]), 1e3, "mV"),
        ("|perfect log interpolated - truth|, moving", np.abs(sampling_error[moving]), 1e3, "mV"),
    ):
        p50, p99 = percentiles(values)
        print(f"  {name:<42s} {p50 * scale:7.2f} {unit} {p99 * scale:7.2f} {unit}"
              f" {np.abs(values).max() * scale:6.2f} {unit}")  # fmt: skip
    median_ms = float(np.median(np.abs(error[moving]))) / achieved * 1e3
    print(f"target median <= 2 ms: {median_ms:.2f} ms ->", "met" if median_ms <= 2 else "MISSED")


if __name__ == "__main__":
    sys.exit(main())
