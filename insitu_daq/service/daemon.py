"""The acquisition daemon: assembles the controllers, the ingest process, the runner and the
outward interfaces, and guarantees the bias is made safe however it stops.

Threads in this process: the bias I/O thread (BiasController), the protocol runner, the
control API server, the metrics HTTP server, a status publisher and the analysis results
listener. Frames never enter this process: the ingest process receives and writes them and
offers each to the live-analysis process over its frame tap (DESIGN.md, data flow).

Live analysis (issue 4, live/): the daemon picks the tap's endpoint (a private ipc
path) and hands it to both processes; it tells the analysis what the frames show, because it
drives the microscope: the imaging state at run start, then every mode, pixel-size or
dose-rate switch with the run-clock interval it took, and a watermark every 10 ms, so that each
frame is judged by its own time, however late either message arrives (service/imaging_announcer.py);
and when the bias first leaves 0 V (the end of the expansion reference). Each result is
published on the `analysis` topic, turned into metrics, sent to the run file (/entry/analysis,
through the ingest) and kept as the latest value per quantity for `hold ... until` conditions
(live_values.py).

Records (bias sample batches, analysis results, events, the ingest's events, status) are
published once on the record bus (bus.py) and fanned out to its subscribers in order: the run
file (the durable copy first), the live values, the analysis's expansion reference, the
metrics and the event stream (sinks.py). A subscriber that fails is logged and counted; the
others still get the record.

A recording that fails fails the run safely (issue 9): before a run starts the data folder
must be there, writable, and have room for the protocol's planned recording
(service/recording_plan.py); when the run file stops taking writes mid-run the ingest process says
so once (ingest/failure.py) and the runner aborts with the run `failed` (or pauses, per
`[recording] on_failure`), which ramps the bias to 0 V and turns the output off.
"""

from __future__ import annotations

import atexit
import logging
import math
import re
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from insitu_daq import __version__
from insitu_daq.analysis.drift import DriftSettings
from insitu_daq.analysis.pipeline import PipelineSettings
from insitu_daq.control.bias import BiasController
from insitu_daq.control.detector import detector_control
from insitu_daq.control.dose import BeamAtLoad, check_planned_dose
from insitu_daq.control.guardian import LOG_FILE_NAME as GUARDIAN_LOG_FILE_NAME
from insitu_daq.control.guardian import Guardian, bias_confirmed_safe
from insitu_daq.control.heater import heater_off, model_heats
from insitu_daq.control.instruments.monitor import InstrumentMonitor, Stamped
from insitu_daq.control.instruments.positioner import HolderControl, MicroscopeControl
from insitu_daq.control.limits import LimitError, SafetyCheck
from insitu_daq.control.protocol import Protocol, ProtocolError
from insitu_daq.control.runner import ProtocolRunner, RunState
from insitu_daq.control.station import StationError
from insitu_daq.control.steps import StepRefused
from insitu_daq.core.clock import RunClock
from insitu_daq.core.config import AnalysisConfig, StationConfig
from insitu_daq.core.imaging import ImagingState
from insitu_daq.core.records import Event, EventKind
from insitu_daq.core.stationlock import (
    StationLock,
    StationLockError,
    daemon_owner,
    daemon_resources,
)
from insitu_daq.ingest import IngestClient, IngestError
from insitu_daq.live.client import AnalysisError, LiveAnalysis
from insitu_daq.live.preview import PreviewTarget
from insitu_daq.runfile.writer import RunMetadata
from insitu_daq.service.api.events import EventPublisher
from insitu_daq.service.api.server import ControlServer
from insitu_daq.service.bus import RecordBus
from insitu_daq.service.dose import BudgetReached, DoseAccountant
from insitu_daq.service.imaging_announcer import ImagingAnnouncer, unknown_state
from insitu_daq.service.live_values import LiveValues
from insitu_daq.service.metrics import DaemonMetrics
from insitu_daq.service.recording_plan import (
    DataDisk,
    RecordingPlan,
    RecordingRate,
    check_room,
    data_disk,
)
from insitu_daq.service.sinks import (
    AnalysisReferenceSink,
    EventStreamSink,
    MetricsSink,
    RunFileSink,
    series_logs,
)
from insitu_daq.service.station import DaemonStation

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 0.5
DATA_DISK_INTERVAL_S = 2.0  # the data disk's free space, for status and metrics
FINAL_STATES = ("finished", "aborted", "failed")


@dataclass
class ActiveRun:
    run_id: str
    path: Path
    clock: RunClock  # the run's clock: the daemon clock shifted to the run's start
    offset_s: float  # daemon-clock seconds at the run's start
    protocol: Protocol
    recording_failure: str | None = None  # why the run file stopped taking writes


def pipeline_settings(config: AnalysisConfig) -> PipelineSettings:
    """The live analysis's settings from the station config's [analysis] section."""
    return PipelineSettings(
        table=config.table(),
        hrtem_counts_per_px=config.hrtem_counts_per_px,
        hrtem_integration_s=config.hrtem_integration_s,
        lm_counts_per_px=config.lm_counts_per_px,
        lm_integration_s=config.lm_integration_s,
        phase_map_interval_s=config.phase_map_interval_s,
        reference_frames=config.reference_frames,
        front_window_s=config.front_window_s,
        drift=DriftSettings(enabled=config.drift),
    )


def make_run_id(protocol_name: str, when: datetime | None = None) -> str:
    stamp = (when or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", protocol_name).strip("-") or "run"
    return f"{stamp}_{safe}"


class Daemon:
    """The insitu-daq service. `start()`, then `wait()` (or serve until a signal), `stop()`."""

    def __init__(
        self,
        config: StationConfig,
        time_scale: float = 1.0,
        config_path: str | Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path  # named in the station lock (core/stationlock.py)
        self.station_lock: StationLock | None = None
        self.clock = RunClock(time_scale)
        self.guardian = Guardian(config, time_scale)
        self.metrics = DaemonMetrics(config.api.metrics_host, config.api.metrics_port)
        self.publisher = EventPublisher.from_config(config.api)
        self.bus = RecordBus()
        self.bias = BiasController(
            config,
            self.clock,
            on_samples=self.bus.publisher("samples"),
            on_event=self._record,
            on_trip=self._on_trip,
            on_lost=self._on_lost,
        )
        self.holder = HolderControl(config.holder, config.retry, on_retry=self._on_retry)
        self.heats = model_heats(config)  # a heating holder: its heater made safe as the bias
        self._heater_unsafe = False  # a heater off that failed: tried again when it answers
        self._chip: Any = None  # a heating holder's newest status (its status' `temperature`)
        if self.heats:
            self.holder.add_observer(self._observe_chip)
        self.microscope = MicroscopeControl(
            config.microscope, config.retry, on_retry=self._on_retry
        )
        self.analysis: LiveAnalysis | None = None
        self._analysis_settings: PipelineSettings | None = None
        if config.analysis.enabled:
            self._analysis_settings = pipeline_settings(config.analysis)
            self.analysis = LiveAnalysis(
                self._analysis_settings,
                on_result=self._on_analysis,
                max_rate_hz=config.analysis.max_rate_hz,
                preview=PreviewTarget(config.web.preview_endpoint, config.web.preview_rate_hz),
            )
        self.imaging = ImagingAnnouncer([] if self.analysis is None else [self.analysis])
        self.detector = detector_control(  # None: a listen-only station
            config.detector,
            on_trigger_failed=lambda why: self.event(EventKind.INSTRUMENT, f"detector: {why}"),
        )
        self.ingest = IngestClient(
            config,
            on_event=self.bus.publisher("ingest_event"),
            clock=self.clock,
            analysis_endpoint=None if self.analysis is None else self.analysis.frame_endpoint,
            on_recording_failed=self._on_recording_failed,
        )
        self.imaging.add_sink(self.ingest)  # every frame's mode etc. in the run file
        # The dose map and budget of the open run (service/dose.py): the imaging timeline in,
        # exposure rows to the run file, the holder's temperature from the bus.
        self.dose = DoseAccountant(
            config.dose,
            self._frame_shape,
            lambda rows: self.bus.publish("series", ("dose_exposure", rows)),
            self._on_dose_budget,
            self.metrics.observe_dose,
        )
        self.imaging.add_sink(self.dose)
        self._illumination_readable = True  # until the microscope says it cannot
        self.run_file = RunFileSink(self.ingest, self._current_run)
        self.live_values = LiveValues(self._current_run, lambda: self.bias.state.connected)
        self.bus.attach(self.run_file)  # first: the durable copy
        self.bus.attach(self.live_values)
        if self.analysis is not None:
            self.bus.attach(AnalysisReferenceSink(self.analysis, self._current_run))
        self.bus.attach(MetricsSink(self.metrics))
        self.bus.attach(EventStreamSink(self.publisher))
        self.bus.attach(self.dose)  # the holder's temperature series (its budget)
        series_logs(self.holder.name, self.holder.series)  # each one declared in the run file
        self.holder_monitor = InstrumentMonitor(  # the holder's series, its loss mid-hold
            self.holder,
            config.holder.poll_interval_s,
            run_clock=lambda: getattr(self._run, "clock", None),
            publish=lambda name, rows: self.bus.publish("series", (name, rows)),
            on_state=self._on_holder_state,
        )
        self.runner = ProtocolRunner(DaemonStation(self))
        self.control = ControlServer.from_config(config.api, self)
        self.metrics.watch_control(self.control.stats)
        self._run: ActiveRun | None = None
        self._run_lock = threading.RLock()
        self._stopping = threading.Event()
        self._stopped = False
        self._status_thread: threading.Thread | None = None
        self._identities: dict[str, str] = {}
        self._last_run_id: str | None = None
        self._last_recording_failure: str | None = None
        self._data_disk: DataDisk | None = None
        self._data_disk_checked = -math.inf  # monotonic

    # ----- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._lock_station()
        try:
            # First: it makes the bias safe should this process die in a way stop() cannot see.
            # It keeps the source-meter's lock until it has done so (core/stationlock.py).
            # A heating holder's lock too: the guardian switches its heater off.
            guarded = self._lock_fds("source-meter")
            guarded += self._lock_fds("holder") if self.heats else ()
            self.guardian.start(keep_locked=guarded)
            if self.analysis is not None:
                self.analysis.start()  # spawns and returns: it starts while the ingest does
            self._make_data_dir()
            # It keeps the detector's lock until it has left the detector (core/stationlock.py).
            self.ingest.start(keep_locked=self._lock_fds("detector"))
            # After the ingest's own atexit hook, so at an abnormal exit this runs first
            # (atexit is last-in first-out): the ramp-down is recorded before ingest stops.
            atexit.register(self.stop)
            self.guardian.wait_ready()  # it started while the ingest process did
            self._wait_analysis()
            self.imaging.start()
            self.bias.start()
            identity = self.bias.identity
            if identity is not None:
                self._identities["source_meter"] = (
                    f"{identity.manufacturer} {identity.model} serial {identity.serial}"
                )
            self._identities["holder"] = self.holder.connect()
            self.holder_monitor.start()
            self._identities["microscope"] = self.microscope.connect()
            for name in ("source_meter", "holder", "microscope"):
                self.metrics.set_instrument_up(name, True)
            self.metrics.start()
            self.publisher.start()
            self.control.start()
            if self.station_lock is not None:  # as bound: a refused daemon names these
                endpoints = {**self.endpoints, "detector": self.config.detector.endpoint}
                self.station_lock.describe(endpoints=endpoints)
        except BaseException:
            self.stop()
            raise
        self._status_thread = threading.Thread(
            target=self._publish_status, name="status", daemon=True
        )
        self._status_thread.start()
        log.info("insitu-daq %s daemon up: %s", __version__, self.endpoints)

    def _lock_station(self) -> None:
        """One daemon per station: before any process, socket or instrument, lock every
        exclusive resource; StationBusyError (one line naming the running daemon) if another
        process serves one of them."""
        try:
            self.station_lock = StationLock.acquire(
                daemon_resources(self.config),
                daemon_owner(
                    self.config,
                    self.endpoints,
                    self.config_path,
                    guardian_log=self.config.data_dir / GUARDIAN_LOG_FILE_NAME,
                ),
                self.config.lock_dir,
            )
        except StationLockError:
            self._stop_analysis()  # nothing started: this removes its private temp folder
            raise

    def _lock_fds(self, kind: str) -> tuple[int, ...]:
        fd = None if self.station_lock is None else self.station_lock.fd(kind)
        return () if fd is None else (fd,)

    def _release_station(self) -> None:
        if self.station_lock is not None:
            self.station_lock.release()

    def _make_data_dir(self) -> None:
        """Create the data folder if it is not there yet (a run is refused while it is not)."""
        try:
            self.config.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            folder = self.config.data_dir
            log.error("data folder %s: %s; runs are refused until it exists", folder, exc.strerror)

    def _wait_analysis(self) -> None:
        """The archive matters more than the live view: an analysis process that does not
        come up is an error event and a 0 on insitu_daq_analysis_up, not a daemon that
        refuses to record."""
        if self.analysis is None:
            return
        try:
            self.analysis.wait_ready()
        except AnalysisError as exc:
            log.error("live analysis unavailable: %s", exc)
            self.metrics.analysis_up.set(0)

    @property
    def endpoints(self) -> dict[str, str]:
        return {
            "control": self.control.endpoint,
            "events": self.publisher.endpoint,
            "metrics": self.metrics.url,
        }

    def stop(self) -> None:
        """Make the bias safe, close the run, stop everything. Idempotent, never raises."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        # The bias first: whatever else fails below, the output is off.
        for step in (
            lambda: self.runner.abort("daemon stopping"),
            self._stop_bias,
            self.holder_monitor.stop,
            self.holder.halt,
            lambda: self.runner.wait(10.0),
            self._close_run,
            self.imaging.stop,
            self._publish_last_status,
            self.ingest.stop,
            self._stop_analysis,
            self.control.stop,
            self.publisher.stop,
            self.metrics.stop,
            self.holder.close,
            self.microscope.close,
            self._release_station,  # last: until here this daemon still used the station
        ):
            try:
                step()
            except Exception:
                log.exception("while stopping")
        log.info("daemon stopped")

    def _publish_last_status(self) -> None:
        """The run is closed and the status thread gone: one last status, so a follower
        (`insitu-daq run`) sees how the run ended rather than the daemon falling silent."""
        self.publisher.publish("status", self.status())

    def _stop_analysis(self) -> None:
        if self.analysis is not None:
            self.analysis.stop()

    def _stop_bias(self) -> None:
        """Bias safe and a heater off; the guardian then stands down, or takes over if either
        is not confirmed."""
        try:
            self.bias.stop()
        finally:
            heater_safe = self.make_heater_safe()
            if bias_confirmed_safe(self.bias) and heater_safe:
                self.guardian.stand_down()
            else:
                self.guardian.take_over()

    # ----- a heating holder --------------------------------------------------------------------
    def check_temperature(self, celsius: float, rate_c_per_s: float | None) -> float:
        """The rate to ramp at; LimitError beyond the limits, StepRefused without a heater."""
        if not self.heats:
            raise StepRefused(
                f"the station's holder ({self.config.holder.model}) has no heater", "celsius"
            )
        return SafetyCheck(self.config.limits).temperature(celsius, rate_c_per_s)

    def make_heater_safe(self) -> bool:
        """A heating holder's heater off (control/heater.py: why off, not a ramp down); True
        once confirmed off, or when the holder has none. Never raises."""
        if not self.heats:
            return True
        try:
            found = self.holder.call(heater_off)
        except Exception as exc:
            self._heater_unsafe = True
            log.critical("heater NOT confirmed off (again when the holder answers): %s", exc)
            return False
        self._heater_unsafe = False
        if found.heater_on:
            self.event(
                EventKind.TEMPERATURE,
                f"heater off (chip at {found.temperature_c:.1f} C)",
                {"heater_on": False, "temperature_c": found.temperature_c},
            )
        return True

    def _observe_chip(self, reading: Stamped[Any]) -> None:
        self._chip = reading.value  # every status read, between runs too (the holder's thread)

    def _temperature_status(self) -> dict[str, Any]:
        """A heating holder's chip for the status: its newest reading (None before one)."""
        chip = self._chip
        return {
            "temperature_c": getattr(chip, "temperature_c", None),
            "setpoint_c": getattr(chip, "setpoint_c", None),
            "target_c": getattr(chip, "target_c", None),
            "heater_on": getattr(chip, "heater_on", None),
            "ramping": getattr(chip, "ramping", None),
            "connected": self.holder_monitor.answering,
        }

    def serve_until_signal(self) -> None:
        """Block until SIGINT/SIGTERM (main thread only), then stop safely."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self._stopping.set())
        try:
            while not self._stopping.wait(0.5):
                pass
        finally:
            self.stop()

    # ----- runs ------------------------------------------------------------------------------
    def start_protocol(self, protocol: Protocol) -> ActiveRun:
        protocol.validate_against(self.config.limits)
        self.check_dose(protocol)
        with self._run_lock:
            if self.runner.busy:
                raise RuntimeError("a protocol is already running")
            plan = self.recording_plan(protocol)
            self._data_disk = check_room(
                self.config.data_dir, plan, self.config.recording.min_free_bytes
            )
            log.info("run of %s: %s", protocol.name, plan.describe())
            run_id = make_run_id(protocol.name)
            path = self.config.data_dir / f"{run_id}.h5"
            run_clock = RunClock(
                self.clock.time_scale,
                start_ns=time.time_ns(),
                start_monotonic_ns=time.monotonic_ns(),
            )
            offset = self.clock.from_monotonic_ns(run_clock.start_monotonic_ns)
            run = ActiveRun(run_id, path, run_clock, offset, protocol)
            metadata = self._metadata(run)
            self._start_analysis_run()
            self.ingest.open_run(metadata, path, run_clock)
            self.dose.open_run()
            self.imaging.open_run(run_clock.now, self._imaging_at_start(metadata.microscope))
            self._run = run
            self._last_run_id = run_id
            self._last_recording_failure = None
        try:
            self.runner.start(protocol, on_done=self._on_protocol_done)
        except BaseException:
            self._close_run()
            raise
        if run.recording_failure is not None:  # it failed before the runner could be told
            self.runner.fail(run.recording_failure)
        return run

    def check_dose(self, protocol: Protocol) -> float:
        """Refuse a protocol whose planned dose breaks the dose budget at the temperature now
        (ProtocolError naming the step, control/dose.py); returns the planned dose."""
        dose = self.config.dose
        start = BeamAtLoad()
        try:
            state = self.microscope.state()
            mode = str(getattr(state.mode, "value", state.mode))
            start = BeamAtLoad(state.beam_on, mode, {mode: state.dose_rate_e_per_a2_s})
        except StationError as exc:  # not known: the beam counts as on, at the config's rate
            log.warning("microscope state unknown for the planned dose: %s", exc)
        budget, key = self.dose.budget()
        return check_planned_dose(
            protocol, self.config.limits, start, dose.dose_rate_e_per_a2_s, budget, key
        )

    def _frame_shape(self) -> tuple[int, int]:
        """The detector's frame (rows, columns): the stream's, else the config's default."""
        geometry = (self.ingest.stats().get("detector") or {}).get("geometry")
        if isinstance(geometry, dict) and len(geometry.get("shape") or ()) == 2:
            rows, cols = geometry["shape"]
            return int(rows), int(cols)
        return self.config.detector.default_shape

    def _specimen_dose_rate(self, beam_on: bool, dose_rate_e_per_a2_s: float) -> float:
        """The dose rate at the specimen now: from the beam current and illuminated area the
        microscope reads (0 blanked), else its dose-rate setting while unblanked, else the
        config's `[dose] dose_rate_e_per_a2_s`."""
        if self._illumination_readable:
            try:
                rate = float(self.microscope.illumination().dose_rate_e_per_a2_s)
                if math.isfinite(rate):
                    return rate
            except (StationError, AttributeError, NotImplementedError) as exc:
                # Asked once: a microscope that cannot is not asked (and retried) every switch.
                log.warning("microscope reads no illumination (%s): its dose rate setting", exc)
                self._illumination_readable = False
        if not beam_on:
            return 0.0
        rate = float(dose_rate_e_per_a2_s)
        return rate if math.isfinite(rate) and rate > 0 else self.config.dose.dose_rate_e_per_a2_s

    def _on_dose_budget(self, reached: BudgetReached) -> None:
        """A region reached its dose budget (its own thread): blank the beam first, then the
        event, then pause (or end) the protocol per `[dose] on_budget`."""
        self.metrics.count_dose_budget_reached()
        try:
            self.runner.station.set_microscope(beam=False)
        except Exception as exc:  # the run ends: nothing more must be imaged unblanked
            log.error("dose budget reached but the beam could not be blanked: %s", exc)
            self.event(EventKind.DOSE_BUDGET, reached.message(), reached.data())
            self.runner.fail(f"dose budget reached and the beam could not be blanked: {exc}")
            return
        self.event(EventKind.DOSE_BUDGET, reached.message(), reached.data())
        if self.config.dose.on_budget == "abort":
            self.runner.abort(reached.message())
        else:
            self.runner.pause(reached.message())

    def recording_plan(self, protocol: Protocol, from_step: int = 0) -> RecordingPlan:
        """What the protocol will write at most (from step `from_step` on, 0-based), at the
        detector's measured (or planned) rate."""
        rate = RecordingRate.of_stream(self.ingest.stats().get("stream_rate"), self.config)
        return RecordingPlan.of(
            protocol, self.config.limits, rate, self.clock.time_scale, from_step
        )

    def _metadata(self, run: ActiveRun) -> RunMetadata:
        limits = self.config.limits
        return RunMetadata(
            run_id=run.run_id,
            title=run.protocol.description or run.protocol.name,
            start_time_ns=run.clock.start_ns,
            sample_name=self.config.sample.name,
            chemical_formula=self.config.sample.chemical_formula,
            protocol_text=run.protocol.text,
            protocol_name=run.protocol.name,
            source_meter={
                "identity": self._identities.get("source_meter", ""),
                "resource": self.config.source_meter.resource,
                "compliance_amperes": limits.compliance_amperes,
                "max_bias_volts": limits.max_bias_volts,
                "max_ramp_rate_volts_per_s": limits.max_ramp_rate_volts_per_s,
                "nplc": self.config.source_meter.nplc,
            },
            holder={
                "identity": self._identities.get("holder", ""),
                "port": self.config.holder.port,
            },
            microscope=self._microscope_metadata(),
            program_version=__version__,
            **self._analysis_metadata(),
        )

    def _analysis_metadata(self) -> dict[str, Any]:
        settings = self._analysis_settings
        if settings is None:
            return {"reflections": (), "analysis_parameters": {"enabled": False}}
        return {"reflections": settings.table.names, "analysis_parameters": settings.to_record()}

    # ----- live analysis ---------------------------------------------------------------------
    def _current_run(self) -> ActiveRun | None:
        return self._run

    def _start_analysis_run(self) -> None:
        """A new run: the analysis forgets the last one (its imaging state comes next)."""
        self.live_values.new_run()
        if self.analysis is not None:
            self.analysis.new_run()

    @staticmethod
    def _imaging_at_start(microscope: dict[str, Any]) -> ImagingState:
        """The imaging state the run starts in (the run file's microscope metadata, read from
        the microscope just now); unknown if it could not be read."""
        try:
            return ImagingState(
                start=-math.inf,
                end=-math.inf,
                mode=str(microscope["mode"]),
                pixel_size_m=float(microscope["pixel_size_nm"]) * 1e-9,
                dose_rate_e_per_a2_s=float(microscope["specimen_dose_rate_e_per_a2_s"]),
                field_x_nm=float(microscope["field_center_x_nm"]),
                field_y_nm=float(microscope["field_center_y_nm"]),
            )
        except (KeyError, TypeError, ValueError):
            log.warning("imaging state unknown at run start: frames wait for a mode change")
            return unknown_state(-math.inf, -math.inf)

    def imaging_switched(self, started_s: float, ended_s: float) -> None:
        """The switch begun (ImagingAnnouncer.begin_switch) at run time `started_s` was done by
        `ended_s`: announce what the microscope shows now (unknown if it does not say)."""
        try:
            state = self.microscope.state()
            current = ImagingState(
                start=started_s,
                end=ended_s,
                mode=str(getattr(state.mode, "value", state.mode)),
                pixel_size_m=state.pixel_size_nm * 1e-9,
                dose_rate_e_per_a2_s=self._specimen_dose_rate(
                    state.beam_on, state.dose_rate_e_per_a2_s
                ),
                field_x_nm=float(state.field_center_nm[0]),
                field_y_nm=float(state.field_center_nm[1]),
            )
        except (StationError, ValueError) as exc:
            log.warning("imaging state after a switch unknown: %s", exc)
            current = unknown_state(started_s, ended_s)
        self.imaging.end_switch(current)

    def _on_analysis(self, result: dict[str, Any]) -> None:
        """A live result (analysis results thread): to the subscribers, if it has values."""
        if isinstance(result.get("values"), dict):
            self.bus.publish("analysis", result)

    def _microscope_metadata(self) -> dict[str, Any]:
        """The microscope's state at the run's start (later changes are events)."""
        metadata: dict[str, Any] = {"identity": self._identities.get("microscope", "")}
        try:
            state = self.microscope.state()
        except StationError as exc:
            log.warning("microscope state unavailable for the run file: %s", exc)
            return metadata
        metadata.update(
            mode=str(getattr(state.mode, "value", state.mode)),
            pixel_size_nm=state.pixel_size_nm,
            beam_on=state.beam_on,
            dose_rate_e_per_a2_s=state.dose_rate_e_per_a2_s,
            cumulative_dose_e_per_a2=state.cumulative_dose_e_per_a2,
            # Where the field is and the dose rate at the specimen (0 blanked): the dose map's.
            field_center_x_nm=float(state.field_center_nm[0]),
            field_center_y_nm=float(state.field_center_nm[1]),
            specimen_dose_rate_e_per_a2_s=self._specimen_dose_rate(
                state.beam_on, state.dose_rate_e_per_a2_s
            ),
        )
        return metadata

    def _on_protocol_done(self, state: str) -> None:
        self._close_run()

    def _close_run(self) -> dict[str, Any] | None:
        if self._run is not None and self.analysis is not None:
            # The results of the run's last frames are still on their way: let them land.
            self.analysis.wait_caught_up(time.time_ns())
        self.imaging.close_run()
        self.dose.close_run()  # its last exposure rows, before the run file closes
        with self._run_lock:
            run, self._run = self._run, None
        if run is None:
            return None
        summary = self.ingest.close_run()
        self.publisher.publish("event", {"kind": "run_closed", "run_id": run.run_id, **summary})
        return summary

    # ----- records in ------------------------------------------------------------------------
    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self._record(Event(self.clock.now(), kind, message, data))

    def _record(self, event: Event) -> None:
        """An event on the daemon clock: logged, then to the run file (run time) and the event
        stream (the bus)."""
        log.info("event %s: %s", event.kind, event.message)
        self.bus.publish("event", event)

    def _on_recording_failed(self, report: dict[str, Any]) -> None:
        """The run file stopped taking writes (ingest listener thread: must not block): the run
        fails, or pauses per [recording] on_failure; either way the bias is made safe."""
        reason = str(report.get("reason", "the run file stopped taking writes"))
        with self._run_lock:
            run = self._run
            current = run is not None and run.run_id == report.get("run_id")
            if current:
                assert run is not None
                if run.recording_failure is not None:
                    return
                run.recording_failure = reason
            self._last_recording_failure = reason
        self.metrics.count_recording_failure(str(report.get("kind", "write_error")))
        log.error("recording failed: %s", reason)
        self.publisher.publish("event", {**report, "kind": EventKind.RECORDING_FAILED})
        if not current:
            return  # the run was closing: its protocol has ended and the bias with it
        if self.config.recording.on_failure == "pause":
            self.runner.pause(f"recording failed: {reason}")
            if self.runner.busy:  # paused (now or by the operator before): bias off all the same
                threading.Thread(
                    target=self.bias.make_safe, name="recording-failed-safe", daemon=True
                ).start()
        else:
            self.runner.fail(reason)

    def _on_retry(self, message: str) -> None:
        self.event(EventKind.INSTRUMENT, message)

    def _on_holder_state(self, answering: bool, message: str) -> None:
        self.metrics.set_instrument_up("holder", answering)
        self.event(EventKind.INSTRUMENT, message)
        if not answering:  # as when a holder step finds it lost: the run fails, bias made safe
            self.runner.fail(message)
        elif self._heater_unsafe and not self.runner.busy:
            # Its run failed while it was lost: the heater it could not switch off, now
            # (the monitor's thread: a short exchange on the link it has just read through).
            self.make_heater_safe()

    def _on_trip(self, reason: str) -> None:
        self.metrics.count_trip()
        self.runner.pause(f"compliance trip: {reason}")

    def _on_lost(self, reason: str) -> None:
        self.metrics.set_instrument_up("source_meter", False)
        self.runner.abort(f"source-meter lost: {reason}")

    # ----- status ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        bias = self.bias.state
        run = self._run
        return {
            "protocol": self.runner.progress.to_dict(),
            "run_id": run.run_id if run else None,
            "last_run_id": self._last_run_id,
            "run_file": str(run.path) if run else None,
            # The daemon clock's reading at the run's start: the event stream's bias and event
            # times are on the daemon clock, the run file's (and analysis results') on the
            # run's, which is this much later.
            "run_offset_s": run.offset_s if run else None,
            "recording_failure": run.recording_failure if run else self._last_recording_failure,
            "data_disk": self._data_disk_status(),
            "bias": {
                "setpoint": bias.setpoint,
                "voltage": bias.voltage,
                "current": bias.current,
                "output_on": bias.output_on,
                "tripped": bias.tripped,
                "connected": bias.connected,
            },
            # Only with a heating holder: a station without a heater shows no temperature.
            **({"temperature": self._temperature_status()} if self.heats else {}),
            "ingest": self.ingest.stats(),
            "guardian": {
                "alive": self.guardian.alive,
                "pid": self.guardian.pid,
                "restarts_total": self.guardian.restarts_total,
            },
            "analysis": None
            if self.analysis is None
            else {
                **self.analysis.stats(),
                "results_after_run_total": self.run_file.analysis_results_after_run_total,
            },
            "dose": self.dose.status(),
            "record_sink_errors": dict(self.bus.errors),
            "time_scale": self.clock.time_scale,
        }

    def _data_disk_status(self) -> dict[str, Any]:
        """The data folder's disk, measured again every DATA_DISK_INTERVAL_S."""
        now = time.monotonic()
        if self._data_disk is None or now - self._data_disk_checked >= DATA_DISK_INTERVAL_S:
            self._data_disk_checked = now
            self._data_disk = data_disk(self.config.data_dir)
            rate = RecordingRate.of_stream(self.ingest.stats().get("stream_rate"), self.config)
            self.metrics.observe_data_disk(
                self._data_disk.free_bytes,
                self._data_disk.size_bytes,
                self._data_disk.writable,
                rate.bytes_per_s,
            )
        disk = self._data_disk
        return {
            "path": str(self.config.data_dir),
            "free_bytes": disk.free_bytes,
            "size_bytes": disk.size_bytes,
            "writable": disk.writable,
            "problem": disk.problem,
        }

    def _publish_status(self) -> None:
        while not self._stopping.wait(STATUS_INTERVAL_S):
            try:
                self.bus.publish("status", self.status())
            except Exception:
                log.exception("status publisher")

    # ----- control API handler ---------------------------------------------------------------
    def handle_ping(self) -> dict[str, Any]:
        return {"version": __version__}

    def handle_status(self) -> dict[str, Any]:
        return self.status()

    def handle_run(self, protocol_text: str, fmt: str, name: str | None) -> dict[str, Any]:
        try:
            protocol = Protocol.parse(protocol_text, fmt, name=name)
            run = self.start_protocol(protocol)
        except (ProtocolError, LimitError, StationError) as exc:
            raise ValueError(str(exc)) from None
        return {"run_id": run.run_id, "run_file": str(run.path)}

    def handle_pause(self, reason: str | None, operator: str | None = None) -> dict[str, Any]:
        self.runner.pause(reason or "paused by operator", operator)
        return {}

    def handle_resume(self, operator: str | None = None) -> dict[str, Any]:
        run = self._run
        if (
            run is not None
            and run.recording_failure is not None
            and self.runner.progress.state is RunState.PAUSED
        ):
            # No run goes on unrecorded: there must be room for the rest of it, and the file
            # must take writes again.
            step = self.runner.progress.step_index or 0
            plan = self.recording_plan(run.protocol, from_step=step)
            try:
                check_room(
                    self.config.data_dir,
                    plan,
                    self.config.recording.min_free_bytes,
                    what=f"the rest of this run (from step {step + 1})",
                )
                self.ingest.retry_recording()
            except (StationError, IngestError) as exc:
                raise RuntimeError(f"not resumed: {exc}") from None
            log.warning("recording again after: %s", run.recording_failure)
            run.recording_failure = self._last_recording_failure = None
        self.runner.resume(operator)
        return {}

    def handle_abort(self, reason: str | None, operator: str | None = None) -> dict[str, Any]:
        self.runner.abort(reason or "aborted by operator", operator)
        return {}

    def handle_mark(self, text: str, operator: str | None = None) -> dict[str, Any]:
        if operator is None:
            self.event(EventKind.MARK, text)
        else:  # who marked, in the run file's event log (kind and message) too
            self.event(EventKind.MARK, f"{text} ({operator})", {"operator": operator})
        return {}
