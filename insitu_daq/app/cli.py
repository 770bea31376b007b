"""The `insitu-daq` command line (DESIGN.md: exit 0 on success, one-line reason on failure)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from insitu_daq import __version__

if TYPE_CHECKING:  # imported where used: `insitu-daq --help` stays quick
    from insitu_daq.core.stationlock import StationLock
    from insitu_daq.sim.launch import StationPorts


def _add_sim(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sim", help="run the simulated station (source-meter, holder, microscope, camera)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default loopback)")
    p.add_argument(
        "--source-meter",
        default="keithley2400",
        metavar="MODEL",
        help="source-meter model to simulate, as the station config's source_meter.model"
        " (keithley2400, keithley2450; default keithley2400)",
    )
    p.add_argument("--source-meter-port", type=int, default=5025)
    p.add_argument(
        "--holder",
        default="open_cell",
        choices=("open_cell", "mems_heating"),
        help="holder to simulate, as the station config's holder.model (default open_cell)",
    )
    p.add_argument("--holder-port", type=int, default=5026)
    p.add_argument("--microscope-port", type=int, default=5027)
    p.add_argument("--camera-port", type=int, default=31001)
    p.add_argument(
        "--camera-api-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also serve the camera's DECTRIS SIMPLON REST API on PORT (e.g. 8000; 0 picks a"
        ' free one), for a station config with [detector] control = "simplon"; default: not'
        " served (the camera free-runs, as a listen-only station expects)",
    )
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
    p.add_argument(
        "--drift", type=float, default=0.0, metavar="NM_S", help="field drift speed (default 0)"
    )
    p.add_argument(
        "--drift-direction", type=float, default=0.0, metavar="DEG",
        help="drift direction in the frame (0: along x, the columns; 90: along y, the rows)",
    )  # fmt: skip
    p.set_defaults(func=_cmd_sim)


def _cmd_sim(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from insitu_daq.core.stationlock import StationLock, sim_owner, sim_resources
    from insitu_daq.sim.launch import StationPorts

    ports = StationPorts(
        args.source_meter_port,
        args.holder_port,
        args.microscope_port,
        args.camera_port,
        camera_api=args.camera_api_port,
    )
    # Before binding anything: a second sim on these ports is refused, naming the first.
    served = {name: port for name, port in asdict(ports).items() if port is not None}
    requested = {name: f"{args.host}:{port}" for name, port in served.items()}
    lock = StationLock.acquire(sim_resources(served.values()), sim_owner(requested))
    with lock:
        return _serve_sim(args, lock, ports)


def _serve_sim(args: argparse.Namespace, lock: StationLock, ports: StationPorts) -> int:
    from insitu_daq.sim.launch import SimulatedInstruments
    from insitu_daq.sim.model import LinearDrift

    sims = SimulatedInstruments.create(
        host=args.host,
        ports=ports,
        time_scale=args.time_scale,
        seed=args.seed,
        frame_shape=(args.frame_size, args.frame_size),
        frame_rate_hz=args.frame_rate,
        compression=None if args.compression == "none" else args.compression,
        source_meter_model=args.source_meter,
        holder_model=args.holder,
        drift=LinearDrift(args.drift, args.drift_direction),
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with sims:
        sims.camera.arm()
        bound = {name: next(iter(e.values())) for name, e in sims.endpoints().items()}
        lock.describe(endpoints=bound)
        print(f"insitu-daq {__version__}: simulated station running (time scale {args.time_scale})")
        for name, endpoints in sims.endpoints().items():
            for kind, address in endpoints.items():
                print(f"  {name:<13} {kind:<8} {address}")
        print("Ctrl-C to stop.", flush=True)
        stop.wait(args.duration)
    print("simulated station stopped", flush=True)
    return 0


def _add_endpoints(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="station TOML (for the daemon's control/event endpoints)")
    p.add_argument("--control", help="control endpoint (default from config: tcp://127.0.0.1:5555)")
    p.add_argument("--events", help="event endpoint (default from config: tcp://127.0.0.1:5556)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon")


def _endpoints(args: argparse.Namespace) -> tuple[str, str]:
    from insitu_daq.core.config import StationConfig, load_config

    api = (load_config(args.config) if args.config else StationConfig()).api
    return args.control or api.control, args.events or api.events


def _request(args: argparse.Namespace, cmd: str, **fields: object) -> dict:
    from insitu_daq.service.api import ControlClient

    control, _ = _endpoints(args)
    with ControlClient(control, timeout_s=args.timeout) as client:
        return client.request(cmd, **fields)


def _add_station_time_scale(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="simulated stations only: station seconds per wall second (match `sim`)",
    )


def _add_daemon(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("daemon", help="run the acquisition service")
    p.add_argument("--config", required=True, help="station TOML (deploy/station.*.toml)")
    _add_station_time_scale(p)
    p.set_defaults(func=_cmd_daemon)


def _add_web(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("web", help="serve the live view and past runs as a web page (docs/WEB.md)")
    p.add_argument("--config", help="station TOML: its [web], [api] and data_dir")
    p.add_argument("--port", type=int, help="listen here instead of [web] port")
    tools = p.add_mutually_exclusive_group()
    tools.add_argument(
        "--hash-password", action="store_true",
        help="read a password (twice) and print its hash for a [[web.users]] entry",
    )  # fmt: skip
    tools.add_argument(
        "--new-token", action="store_true",
        help="print a new token (give it to its holder) and its hash (put it in the config)",
    )  # fmt: skip
    p.set_defaults(func=_cmd_web)


def _cmd_web(args: argparse.Namespace) -> int:
    from insitu_daq.core.config import load_config

    if args.hash_password:
        return _print_password_hash()
    if args.new_token:
        from insitu_daq.web.auth import new_token

        token, hashed = new_token()
        print(f"token (give it to its holder; not kept anywhere): {token}")
        print(f'config: token = "{hashed}"')
        return 0
    if args.config is None:
        raise SystemExit("insitu-daq web: --config is required to serve")
    from insitu_daq.web.server import serve

    config = load_config(args.config)
    if args.port is not None:
        config = config.model_copy(
            update={"web": config.web.model_copy(update={"port": args.port})}
        )
    # uvicorn ends on SIGINT and SIGTERM by itself, closing the viewers' sockets.
    serve(config, announce=lambda line: print(line, flush=True))
    return 0


def _print_password_hash() -> int:
    import getpass

    from insitu_daq.web.auth import hash_password

    first = getpass.getpass("password: ")
    if not first or first != getpass.getpass("again: "):
        print("the two differ (or are empty); nothing printed", file=sys.stderr)
        return 1
    print(f'password = "{hash_password(first)}"')
    return 0


def _cmd_daemon(args: argparse.Namespace) -> int:
    from insitu_daq.core.config import load_config
    from insitu_daq.service.daemon import Daemon

    daemon = Daemon(load_config(args.config), time_scale=args.time_scale, config_path=args.config)
    # SIGTERM while starting (a demo or systemd giving up on it): unwind start() like Ctrl-C, so
    # it stops what it began and the guardian stands down; without this the process would die
    # on the spot and leave the guardian to take over the source-meter.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        daemon.start()  # refused first thing if another daemon serves this station
    except KeyboardInterrupt:
        print("daemon stopped while starting; bias output off", flush=True)
        return 1
    print(f"insitu-daq {__version__}: daemon running", flush=True)
    for name, address in daemon.endpoints.items():
        print(f"  {name:<8} {address}", flush=True)
    daemon.serve_until_signal()
    print("daemon stopped; bias output off", flush=True)
    return 0


def _add_safe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "safe",
        help="no daemon running and the bias may be on: ramp the source-meter to 0 V, output"
        " off (and a heating holder's heater off)",
    )
    p.add_argument("--config", required=True, help="station TOML (source-meter, limits, retry)")
    _add_station_time_scale(p)
    p.set_defaults(func=_cmd_safe)


def _cmd_safe(args: argparse.Namespace) -> int:
    """The operator's recovery when nothing is left to make the bias safe (the daemon and its
    guardian both killed): the guardian's own ramp-down, from the station config."""
    import zmq

    from insitu_daq.control.guardian import make_source_meter_safe
    from insitu_daq.control.heater import make_holder_safe, model_heats
    from insitu_daq.core.config import load_config
    from insitu_daq.service.api import ControlClient, ControlError, ControlTimeoutError

    config = load_config(args.config)
    # A running daemon drives the source-meter itself (one controller at a time): ask it.
    try:
        with ControlClient(config.api.control, timeout_s=1.0) as client:
            client.request("ping")
        daemon_answers = True
    except ControlError:  # it answered, refusing: still a daemon
        daemon_answers = True
    except (ControlTimeoutError, zmq.ZMQError):
        daemon_answers = False  # nobody answers: nobody else drives the bias
    if daemon_answers:
        raise RuntimeError(
            f"a daemon answers on {config.api.control}: `insitu-daq abort` makes the bias safe"
            " through it (`safe` is for when no daemon runs)"
        )
    logging.getLogger("insitu_daq.control.guardian").setLevel(
        logging.INFO
    )  # say what it found and did
    resource = config.source_meter.resource
    if not make_source_meter_safe(config, args.time_scale, persist_s=0.0):
        raise RuntimeError(f"source-meter {resource} not reached: its output may still be on")
    print(f"source-meter {resource}: at 0 V, output off", flush=True)
    if model_heats(config):  # a heating holder: its heater off too (control/heater.py)
        logging.getLogger("insitu_daq.control.heater").setLevel(logging.INFO)
        if not make_holder_safe(config, persist_s=0.0):
            raise RuntimeError(f"heating holder {config.holder.port} not reached: heater may be on")
        print(f"heating holder {config.holder.port}: heater off", flush=True)
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a protocol on the daemon and show its progress")
    p.add_argument("protocol", help="protocol file (YAML or TOML)")
    p.add_argument("--detach", action="store_true", help="start it and return at once")
    _add_endpoints(p)
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from insitu_daq.app.progress import follow_run

    path = Path(args.protocol)
    fmt = "toml" if path.suffix.lower() == ".toml" else "yaml"
    reply = _request(args, "run", protocol_text=path.read_text(), format=fmt, name=path.stem)
    print(f"run {reply['run_id']} -> {reply['run_file']}", flush=True)
    if args.detach:
        return 0
    control, events = _endpoints(args)
    return follow_run(control, events, reply["run_id"], timeout_s=args.timeout)


def _add_simple(sub: argparse._SubParsersAction, name: str, help_text: str, **arguments) -> None:
    p = sub.add_parser(name, help=help_text)
    for arg, kwargs in arguments.items():
        p.add_argument(arg, **kwargs)
    _add_endpoints(p)
    p.set_defaults(func=_cmd_simple, command_name=name)


def _login_name() -> str:
    """Who typed the command, recorded with a control (getpass reads $LOGNAME, $USER...)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return f"uid {os.getuid()}"


def _cmd_simple(args: argparse.Namespace) -> int:
    import json

    fields = {}
    if args.command_name == "mark":
        fields["text"] = " ".join(args.text)
    if args.command_name in ("pause", "abort") and args.reason:
        fields["reason"] = args.reason
    if args.command_name in ("pause", "resume", "abort", "mark"):
        fields["operator"] = _login_name()
    reply = _request(args, args.command_name, **fields)
    reply.pop("ok", None)
    if args.command_name == "status":
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        print(f"{args.command_name}: ok")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="summarise a run file and draw its figure (PNG)")
    p.add_argument("run_file", help="RUN.h5")
    p.add_argument("--events", type=int, default=20, help="how many events to list")
    figure = p.add_mutually_exclusive_group()
    figure.add_argument(
        "--figure", metavar="PATH", help="where to write the figure (default: RUN.png next to it)"
    )
    figure.add_argument("--no-figure", action="store_true", help="the text summary only")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    import h5py

    from insitu_daq.report.analysis import format_analysis, read_analysis
    from insitu_daq.report.summary import format_summary, summarize
    from insitu_daq.runfile import layout

    print(format_summary(summarize(args.run_file), events=args.events), flush=True)
    with h5py.File(args.run_file, "r", libver="latest", swmr=True) as f:
        print(format_analysis(read_analysis(f[layout.ENTRY])), flush=True)
    if not args.no_figure:
        from insitu_daq.report.figure import draw_report_figure

        out = Path(args.figure) if args.figure else Path(args.run_file).with_suffix(".png")
        print(f"figure       {draw_report_figure(args.run_file, out).path}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from insitu_daq.app.demo import (
        DEFAULT_PROTOCOL,
        DEFAULT_SOURCE_METER,
        DEFAULT_TIME_SCALE,
        REFERENCE_PROTOCOL,
    )

    p = sub.add_parser("demo", help="the +4.3 V reference experiment on the simulated station")
    p.add_argument(
        "--time-scale", type=float, default=DEFAULT_TIME_SCALE,
        help=f"physics speed-up (default {DEFAULT_TIME_SCALE:g}); 1 runs in real time",
    )  # fmt: skip
    p.add_argument("--data-dir", default="runs", help="where the run file goes (default ./runs)")
    p.add_argument("--frame-size", type=int, default=1024)
    p.add_argument("--frame-rate", type=float, default=40.0)
    p.add_argument(
        "--protocol",
        default=DEFAULT_PROTOCOL,
        help=f"a shipped protocol's file name (default {DEFAULT_PROTOCOL}: hold until rock salt;"
        f" {REFERENCE_PROTOCOL}: the fixed 120 s reference hold)",
    )
    p.add_argument("--no-figure", action="store_true", help="do not draw the report figure")
    p.add_argument(
        "--web", action="store_true",
        help="keep the web view up after the run, to look at the finished run (Ctrl-C ends it)",
    )  # fmt: skip
    p.add_argument(
        "--source-meter",
        default=DEFAULT_SOURCE_METER,
        metavar="MODEL",
        help=f"source-meter model, simulated and configured (default {DEFAULT_SOURCE_METER};"
        " also keithley2450)",
    )
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from insitu_daq.app.demo import run_demo

    # SIGTERM (a test's timeout, a closed terminal's session) as Ctrl-C: the run is aborted
    # and the demo's children (station, daemon, web view) stopped on the way out. Python's
    # default would end the demo on the spot and leave them running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return run_demo(
        time_scale=args.time_scale,
        data_dir=Path(args.data_dir),
        frame_size=args.frame_size,
        frame_rate=args.frame_rate,
        protocol=args.protocol,
        figure=not args.no_figure,
        source_meter_model=args.source_meter,
        web=args.web,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="insitu-daq",
        description="Control and live acquisition for in situ biasing TEM experiments.",
    )
    parser.add_argument("--version", action="version", version=f"insitu-daq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_sim(sub)
    _add_daemon(sub)
    _add_web(sub)
    _add_run(sub)
    _add_simple(sub, "status", "show the daemon's state")
    _add_simple(sub, "pause", "pause the running protocol", **{"--reason": {}})
    _add_simple(sub, "resume", "resume a paused protocol")
    _add_simple(sub, "abort", "abort the protocol (bias made safe first)", **{"--reason": {}})
    _add_simple(sub, "mark", "annotate the run", text={"nargs": "+"})
    _add_safe(sub)
    _add_report(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Ctrl-C ends the demo and its page and aborts `run`'s run, so it is honoured even when
    # started with SIGINT ignored (a background job of a non-interactive shell, some CI
    # runners): Python raises KeyboardInterrupt only if SIGINT was at its default at start-up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one-line reason on failure, as DESIGN.md asks
        if args.verbose:
            raise
        print(f"insitu-daq: error: {exc}", file=sys.stderr)
        return 1
