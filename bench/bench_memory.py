"""Resident memory of the daemon and its ingest process over a long recording.

What it measures. `insitu-daq sim` (the simulated station, camera rendering 1024 x 1024 HRTEM
frames at 40 frames/s, bslz4) and `insitu-daq daemon` run as two real processes, exactly as in
production; a protocol approaches, starts recording, ramps to +1 V and holds it for
`--minutes`, then ramps down. Every `--every` seconds the resident set size (VmRSS in
/proc/<pid>/status) of the daemon process and of its ingest process is read. Reported per
process: RSS at the start of the hold, at the end and its maximum, and the slope (MB/min, least
squares) after a warm-up, with the growth that slope would give over a 3-hour session.
"Does not grow" = the post-warm-up slope stays within --tolerance MB/min (default 0.5, i.e. under
30 MB an hour); what a long run keeps in memory by design is said in bench/README.md.

Run (the full figure is 10 minutes; run it in the background):
    /tmp/v/bin/python bench/bench_memory.py [--minutes 10] [--every 5] [--warmup 2]
        [--keep] [--csv FILE]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from insitu_daq.app.children import check_children, child_process
from insitu_daq.app.demo import free_ports, station_toml, wait_for_daemon
from insitu_daq.app.progress import FINAL_STATES
from insitu_daq.core.module_command import module_command
from insitu_daq.report.summary import RunSummary, summarize
from insitu_daq.service.api import ControlClient

PROTOCOL = """
name: bench_memory
description: hold +1 V while recording, for the memory benchmark
steps:
  - microscope: {{mode: hrtem, beam: on, dose_rate_e_per_a2_s: 35}}
  - approach: {{speed_nm_s: 500, max_travel_nm: 5000}}
  - acquire: start
  - bias: {{volts: 1.0, rate_volts_per_s: 1.0}}
  - hold: {{duration_s: {hold_s}}}
  - bias: {{volts: 0, rate_volts_per_s: 1.0}}
  - acquire: stop
"""


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process in MB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def slope_mb_per_min(minutes: np.ndarray, mb: np.ndarray) -> float:
    if len(minutes) < 3:
        return float("nan")
    return float(np.polyfit(minutes, mb, 1)[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the hold")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between RSS readings")
    parser.add_argument("--warmup", type=float, default=2.0, help="minutes left out of the slope")
    parser.add_argument("--tolerance", type=float, default=0.5, help="MB/min counted as flat")
    parser.add_argument("--keep", action="store_true", help="keep the run file and logs")
    parser.add_argument("--csv", type=Path, default=None, help="write every reading here")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the run file")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench_memory_", dir=args.dir))
    names = ["source_meter", "holder", "microscope", "camera", "control", "events", "metrics"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    config = workdir / "station.toml"
    config.write_text(station_toml(ports, workdir / "runs", 1.0))
    sim_command = module_command(
        "insitu_daq", "sim", "--source-meter-port", str(ports["source_meter"]),
        "--holder-port", str(ports["holder"]), "--microscope-port", str(ports["microscope"]),
        "--camera-port", str(ports["camera"]), "--frame-size", "1024", "--frame-rate", "40",
    )  # fmt: skip
    control = f"tcp://127.0.0.1:{ports['control']}"
    print(f"bench_memory: {args.minutes:g} min hold at +1 V, camera 40 frames/s 1024x1024 HRTEM"
          f" bslz4, RSS every {args.every:g} s; work folder {workdir}", flush=True)  # fmt: skip
    readings: list[tuple[float, float, float, float]] = []  # (min since hold, daemon, ingest, sim)
    summary: RunSummary | None = None
    after_close: tuple[float | None, float | None] = (None, None)
    try:
        with (
            child_process("simulated station", sim_command, workdir / "sim.log") as sim,
            child_process(
                "daemon",
                module_command("insitu_daq", "daemon", "--config", str(config)),
                workdir / "daemon.log",
            ) as daemon,
        ):
            wait_for_daemon(control, daemon, [sim])
            with ControlClient(control, timeout_s=10.0) as client:
                protocol = PROTOCOL.format(hold_s=args.minutes * 60)
                reply = client.request("run", protocol_text=protocol, format="yaml")
                run_file = Path(reply["run_file"])
                ingest_pid, hold_started, last_print = None, None, 0.0
                while True:
                    status = client.request("status")
                    state = status["protocol"].get("state")
                    ingest_pid = ingest_pid or status["ingest"].get("pid")
                    if hold_started is None and status["protocol"].get("step_kind") == "hold":
                        hold_started = time.monotonic()
                    if hold_started is not None and ingest_pid is not None:
                        minutes = (time.monotonic() - hold_started) / 60
                        reading = (
                            minutes,
                            rss_mb(daemon.pid) or float("nan"),
                            rss_mb(ingest_pid) or float("nan"),
                            rss_mb(sim.pid) or float("nan"),
                        )
                        readings.append(reading)
                        if time.monotonic() - last_print >= 60 or len(readings) == 1:
                            last_print = time.monotonic()
                            frames = status["ingest"].get("frames_written_total")
                            print(f"  {minutes:5.1f} min  daemon {reading[1]:6.1f} MB  ingest"
                                  f" {reading[2]:6.1f} MB  (sim {reading[3]:6.1f} MB)  frames"
                                  f" {frames}", flush=True)  # fmt: skip
                    if state in FINAL_STATES and status.get("run_id") is None:
                        time.sleep(2.0)  # the run is closed: what the processes keep now
                        assert ingest_pid is not None
                        after_close = (rss_mb(daemon.pid), rss_mb(ingest_pid))
                        break
                    check_children([sim, daemon])
                    time.sleep(args.every)
            summary = summarize(run_file)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if args.csv:
        with args.csv.open("w") as f:
            f.write("minutes,daemon_rss_mb,ingest_rss_mb,sim_rss_mb\n")
            f.writelines(",".join(f"{v:.4f}" for v in r) + "\n" for r in readings)
    data = np.array(readings)
    hold = data[data[:, 0] <= args.minutes]  # the ramp down and close come after
    warm = hold[hold[:, 0] >= args.warmup]
    if summary is not None:
        rate = summary.frame_rate_hz or 0.0
        print(f"protocol {state}; run file: {summary.frames} frames at {rate:.2f} frames/s,"
              f" {summary.missing_image_ids} image_ids missing, {summary.bias_samples} bias"
              f" samples")  # fmt: skip
    print(f"{len(readings)} readings over {data[-1, 0]:.1f} min; slope after {args.warmup:g} min")
    print("process   start MB   end MB   max MB   slope MB/min   3 h at that slope")
    flat = True
    for column, name in ((1, "daemon"), (2, "ingest"), (3, "(sim)")):
        slope = slope_mb_per_min(warm[:, 0], warm[:, column])
        if name != "(sim)":
            flat = flat and abs(slope) <= args.tolerance
        values = hold[:, column]
        print(f"{name:<8s} {values[0]:8.1f} {values[-1]:8.1f} {values.max():8.1f}"
              f"   {slope:+12.3f}   {slope * 180:+10.1f} MB")  # fmt: skip
    daemon_after, ingest_after = (f"{v:.1f}" if v is not None else "?" for v in after_close)
    print(f"after the run closed: daemon {daemon_after} MB, ingest {ingest_after} MB")
    print(f"does not grow (|slope| <= {args.tolerance:g} MB/min):", "yes" if flat else "NO")
    return 0


if __name__ == "__main__":
    sys.exit(main())
