"""The `insitu-daq` command line (DESIGN.md: exit 0 on success, one-line reason on failure)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from . import __version__


def _add_sim(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sim", help="run the simulated station (source-meter, holder, microscope, camera)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default loopback)")
    p.add_argument("--source-meter-port", type=int, default=5025)
    p.add_argument("--holder-port", type=int, default=5026)
    p.add_argument("--microscope-port", type=int, default=5027)
    p.add_argument("--camera-port", type=int, default=31001)
    p.add_argument("--time-scale", type=float, default=1.0, help="model seconds per wall second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frame-size", type=int, default=1024, help="square frame edge in pixels")
    p.add_argument("--frame-rate", type=float, default=40.0, help="frames per second")
    p.add_argument(
        "--compression",
        choices=("bslz4", "lz4", "none"),
        default="bslz4",
        help="Stream V2 image compression",
    )
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.set_defaults(func=_cmd_sim)


def _cmd_sim(args: argparse.Namespace) -> int:
    from .sim.launch import SimulatedInstruments, StationPorts

    sims = SimulatedInstruments.create(
        host=args.host,
        ports=StationPorts(
            args.source_meter_port, args.holder_port, args.microscope_port, args.camera_port
        ),
        time_scale=args.time_scale,
        seed=args.seed,
        frame_shape=(args.frame_size, args.frame_size),
        frame_rate_hz=args.frame_rate,
        compression=None if args.compression == "none" else args.compression,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with sims:
        sims.camera.arm()
        print(f"insitu-daq {__version__}: simulated station running (time scale {args.time_scale})")
        for name, endpoints in sims.endpoints().items():
            for kind, address in endpoints.items():
                print(f"  {name:<13} {kind:<8} {address}")
        print("Ctrl-C to stop.", flush=True)
        stop.wait(args.duration)
    print("simulated station stopped", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="insitu-daq",
        description="Control and live acquisition for in situ biasing TEM experiments.",
    )
    parser.add_argument("--version", action="version", version=f"insitu-daq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_sim(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one-line reason on failure, as DESIGN.md asks
        if args.verbose:
            raise
        print(f"insitu-daq: error: {exc}", file=sys.stderr)
        return 1
