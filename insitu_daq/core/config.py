"""Station configuration: a TOML file validated with pydantic before anything is touched.

Only this file changes between the simulated station and a real one. A wrong value is refused
at start with one line naming the field (`ConfigError`).
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from insitu_daq.analysis.reflections import DEFAULT_REFLECTIONS, ReflectionTable
from insitu_daq.core.instrument_models import unknown_model
from insitu_daq.core.uniquekeys import toml_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

Positive = Annotated[float, Field(gt=0)]


class ConfigError(ValueError):
    """A station config or protocol that cannot be used; the message is one line."""


def is_loopback(endpoint: str) -> bool:
    """True for endpoints reachable only from this machine (ipc, inproc, 127/8, ::1, lo): the
    one rule for the config's check and the API's binding (service/api/curve.py)."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name or a host name: not provably local
        return False


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_model(kind: str, model: str) -> str:
    """`model` if the instrument factory knows it for `kind`, else ValueError naming the known.

    The one list of models is core/instrument_models.py (strings only: no driver imported).
    """
    why = unknown_model(kind, model)
    if why is not None:
        raise ValueError(why)
    return model


class SourceMeterConfig(_Section):
    # Which driver speaks to it (core/instrument_models.py), e.g. "keithley2400", "keithley2450".
    model: str = "keithley2400"
    resource: str = "TCPIP::127.0.0.1::5025::SOCKET"
    visa_library: str = "@py"
    timeout_s: Positive = 2.0
    nplc: Annotated[float, Field(ge=0.01, le=10)] = 0.1
    line_frequency_hz: Literal[50, 60] = 50

    @field_validator("model")
    @classmethod
    def _model_known(cls, model: str) -> str:
        return _known_model("source_meter", model)


class HolderConfig(_Section):
    model: str = "open_cell"  # core/instrument_models.py HOLDERS
    port: str = "socket://127.0.0.1:5026"
    baudrate: int = 115200
    timeout_s: Positive = 2.0
    # How often the holder's readings (its SERIES: position...) are taken while nothing else
    # talks to it, wall seconds: a holder that stops answering mid-hold is noticed this soon
    # (plus the [retry] attempts). A move's own status polls are recorded as they come.
    poll_interval_s: Annotated[float, Field(ge=0.05, le=60)] = 0.5

    @field_validator("model")
    @classmethod
    def _model_known(cls, model: str) -> str:
        return _known_model("holder", model)


class DetectorConfig(_Section):
    endpoint: str = "tcp://127.0.0.1:31001"
    # Store payloads as received (bslz4/lz4 kept) or decompressed and written raw.
    archive_compression: Literal["as_received", "none"] = "as_received"
    receive_hwm: Annotated[int, Field(ge=1)] = 1000
    # Reorder window of the ingest: images held while an earlier image_id is missing, until
    # this many are held or the oldest waited this long (then the gap is recorded).
    reorder_window_frames: Annotated[int, Field(ge=1, le=4096)] = 16
    reorder_window_s: Annotated[float, Field(gt=0, le=10)] = 0.5
    # Frame geometry of a run opened before the detector sent a start or an image: wait this
    # long for one, then use these defaults (a series with another geometry re-makes or adds
    # frame datasets when its first image arrives: runfile/frames.py).
    geometry_timeout_s: Annotated[float, Field(ge=0, le=60)] = 2.0
    # A recording run that gets no image for this long (wall seconds) records a `detector
    # silent` event, and a `detector back` one when images come again (ingest/silence.py).
    silent_after_s: Annotated[float, Field(gt=0, le=3600)] = 2.0
    default_channels: Annotated[tuple[str, ...], Field(min_length=1)] = ("threshold_1",)
    default_shape: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = (1024, 1024)
    default_dtype: Literal["uint8", "uint16", "uint32"] = "uint16"  # little-endian
    default_compression: Literal["bslz4", "lz4", "none"] = "bslz4"
    # Frames per second the detector is assumed to send before it has been heard: only for
    # planning a run's recording (the rate measured from the stream replaces it); with
    # control = "simplon", the rate it is armed at.
    default_frame_rate_hz: Annotated[float, Field(gt=0, le=100_000)] = 40.0
    # Who starts the detector's series. "none": nobody here, the daemon records what it
    # streams (listen-only). "simplon": `acquire: start` configures it (the rate above,
    # count_time_s, default_compression) and arms it over its DECTRIS SIMPLON REST API at
    # `api_url`, knows the series id it will stream, triggers it, and `acquire: stop`
    # disarms it (insitu_daq/control/detector.py).
    control: Literal["none", "simplon"] = "none"
    api_url: str = "http://127.0.0.1:8000"
    api_timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0  # every request but trigger
    # An armed series' exposure per image (unset: the frame time less the detector's readout
    # time) and the most images it may hold: the detector ends it by itself after that many
    # (~69 h at 40 frames/s), `acquire: stop` disarms it before.
    count_time_s: Annotated[float, Field(gt=0, le=3600)] | None = None
    series_max_images: Annotated[int, Field(ge=1, le=2**31 - 1)] = 10_000_000

    @field_validator("api_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// address")
        return url

    @field_validator("count_time_s")
    @classmethod
    def _exposure_fits_the_frame(
        cls, count_time_s: float | None, info: ValidationInfo
    ) -> float | None:
        rate = info.data.get("default_frame_rate_hz")
        if count_time_s is not None and rate is not None and count_time_s >= 1 / rate:
            raise ValueError(
                f"{count_time_s:g} s is not shorter than the frame time {1 / rate:g} s "
                "(1 / default_frame_rate_hz)"
            )
        return count_time_s


class MicroscopeConfig(_Section):
    model: str = "remote"  # core/instrument_models.py MICROSCOPES
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 5027
    timeout_s: Positive = 2.0

    @field_validator("model")
    @classmethod
    def _model_known(cls, model: str) -> str:
        return _known_model("microscope", model)


class SafetyLimits(_Section):
    max_bias_volts: Annotated[float, Field(gt=0, le=210)] = 5.0
    compliance_amperes: Annotated[float, Field(ge=1e-9, le=1.05)] = 100e-9
    max_ramp_rate_volts_per_s: Annotated[float, Field(gt=0, le=100)] = 1.0
    # Largest single level change while ramping: the ramp is a staircase of these.
    ramp_step_volts: Annotated[float, Field(gt=0, le=1)] = 0.01
    # A heating holder's (control/heater.py): the highest target and the fastest setpoint ramp
    # a protocol may ask for. Conservative defaults: a heating station raises them on purpose.
    max_temperature_c: Annotated[float, Field(gt=0, le=1200)] = 100.0
    max_temperature_rate_c_per_s: Annotated[float, Field(gt=0, le=1000)] = 1.0


class DoseConfig(_Section):
    """Electron dose per region of the specimen and its budget (SCIENCE.md; service/dose.py)."""

    # Highest dose any region may take, e/A^2; above `hot_above_celsius` (the holder's
    # `temperature` series; none known: room temperature) the lower `hot_budget_e_per_a2`.
    budget_e_per_a2: Annotated[float, Field(gt=0)] = 5000.0
    hot_budget_e_per_a2: Annotated[float, Field(gt=0)] = 2500.0
    hot_above_celsius: float = 275.0
    # Reaching a budget blanks the beam, then pauses the protocol or ends it (aborted).
    on_budget: Literal["pause", "abort"] = "pause"
    # The dose rate when the microscope cannot tell its own (no beam current or illuminated
    # area to read): for the per-frame dose, the map and the protocol's planned dose.
    dose_rate_e_per_a2_s: Annotated[float, Field(gt=0, le=10_000)] = 35.0


class SamplingConfig(_Section):
    bias_rate_hz: Annotated[float, Field(ge=1, le=1000)] = 50.0
    flush_interval_s: Annotated[float, Field(gt=0, le=1)] = 0.5


class RetryConfig(_Section):
    attempts: Annotated[int, Field(ge=1, le=100)] = 5
    first_delay_s: Positive = 0.1
    max_delay_s: Positive = 2.0


class RecordingConfig(_Section):
    """What happens when the run file stops taking writes, and the room a run must have."""

    # "abort": the run ends `failed` (bias ramped to 0 V, output off); "pause": the bias is
    # made safe the same way and the protocol paused, so `resume` can go on once there is room.
    on_failure: Literal["abort", "pause"] = "abort"
    # A run starts only if the data disk would still have this much free at its planned end.
    min_free_bytes: Annotated[int, Field(ge=0)] = 1 << 30


class ApiConfig(_Section):
    control: str = "tcp://127.0.0.1:5555"
    events: str = "tcp://127.0.0.1:5556"
    metrics_host: str = "127.0.0.1"
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9105
    curve_secret_key_file: Path | None = None
    # Folder of the client public keys (zmq.auth certificates) let in; unset: any CURVE client.
    curve_clients_dir: Path | None = None

    @model_validator(mode="after")
    def _curve_off_loopback(self) -> ApiConfig:
        for name in ("control", "events"):
            endpoint = getattr(self, name)
            if not is_loopback(endpoint) and self.curve_secret_key_file is None:
                raise ValueError(f"{name}={endpoint!r} is not loopback: set curve_secret_key_file")
        return self


class SampleConfig(_Section):
    name: str = "LiNiO2 particle"
    chemical_formula: str = "LiNiO2"


class ReflectionConfig(_Section):
    """One tracked reflection (analysis/reflections.py); label defaults to the name."""

    name: str
    d_angstrom: float
    phase: str
    marks: bool = False
    label: str | None = None


class AnalysisConfig(_Section):
    """Live analysis (issue 4): what it tracks and how often it runs the costlier parts."""

    enabled: bool = True
    # Default: SCIENCE.md's table of spacings (analysis/reflections.py DEFAULT_REFLECTIONS).
    reflections: tuple[ReflectionConfig, ...] = tuple(
        ReflectionConfig(**record) for record in DEFAULT_REFLECTIONS.to_records()
    )
    # Frames are summed to a dose before they are analysed (one low-dose HRTEM frame is not
    # enough for the rock-salt rings; analysis/pipeline.py): mean counts per pixel wanted, and
    # the oldest frame (run-clock s) a sum may hold.
    hrtem_counts_per_px: Annotated[float, Field(ge=0, le=1e6)] = 5.0
    hrtem_integration_s: Annotated[float, Field(ge=0, le=60)] = 4.0
    lm_counts_per_px: Annotated[float, Field(ge=0, le=1e6)] = 40.0
    lm_integration_s: Annotated[float, Field(ge=0, le=60)] = 0.5
    phase_map_interval_s: Annotated[float, Field(ge=0, le=60)] = 0.125  # run s between maps
    # At most this many results a second (the sum measured at its newest frame when one is
    # due): the CPU the analysis may take from the ingest on a 2-core PC. Every frame received
    # is summed all the same, so the sums above do not depend on it (live/process.py).
    max_rate_hz: Annotated[float, Field(gt=0, le=1000)] = 20.0
    # The ingest has priority: while it is behind the detector it offers the analysis no
    # frames but one every 1/min_rate_hz s, so the analysis is never starved (ingest/tap.py).
    min_rate_hz: Annotated[float, Field(gt=0, le=1000)] = 2.0
    reference_frames: Annotated[int, Field(ge=1, le=1000)] = 10  # LM frames before the bias
    front_window_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    # Measure the field's drift and sum frames drift-corrected (analysis/drift.py): off by
    # default, as it costs each frame a registration (and a shift when the field moved).
    drift: bool = False
    # A live value older than this (wall seconds) is no longer "live": hold-until sees None.
    live_value_max_age_s: Annotated[float, Field(gt=0, le=600)] = 5.0

    @field_validator("reflections")
    @classmethod
    def _table_is_valid(
        cls, reflections: tuple[ReflectionConfig, ...]
    ) -> tuple[ReflectionConfig, ...]:
        _table_of(reflections)
        return reflections

    @field_validator("min_rate_hz")
    @classmethod
    def _floor_within_cap(cls, min_rate_hz: float, info: ValidationInfo) -> float:
        max_rate_hz = info.data.get("max_rate_hz")
        if max_rate_hz is not None and min_rate_hz > max_rate_hz:
            raise ValueError(f"{min_rate_hz} is above max_rate_hz ({max_rate_hz})")
        return min_rate_hz

    def table(self) -> ReflectionTable:
        """The reflections as an analysis ReflectionTable (ValueError naming the problem)."""
        return _table_of(self.reflections)


def _table_of(reflections: tuple[ReflectionConfig, ...]) -> ReflectionTable:
    if not reflections:
        raise ValueError("at least one reflection is needed")
    return ReflectionTable.from_records(r.model_dump(exclude_none=True) for r in reflections)


WEB_ROLES = ("operator", "viewer")


class WebUser(_Section):
    """A person who may log in to the web view (docs/WEB.md): a password (kept as an scrypt
    hash, `insitu-daq web --hash-password`) or a token (kept as its SHA-256), or both."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.@-]+$")]
    role: str = "viewer"
    password: str | None = None  # "scrypt$<n>$<r>$<p>$<salt hex>$<hash hex>"
    token: str | None = None  # "sha256$<hex>"

    @field_validator("role")
    @classmethod
    def _role_known(cls, role: str) -> str:
        if role not in WEB_ROLES:
            raise ValueError(f"unknown role {role!r}; known: {', '.join(WEB_ROLES)}")
        return role

    @field_validator("password")
    @classmethod
    def _password_hashed(cls, password: str | None) -> str | None:
        # A plain password in a config file is refused: the file is read by many.
        if password is not None:
            parts = password.split("$")
            if len(parts) != 6 or parts[0] != "scrypt" or not all(parts[1:4]):
                raise ValueError(
                    "not an scrypt hash: make one with `insitu-daq web --hash-password`"
                )
        return password

    @field_validator("token")
    @classmethod
    def _token_hashed(cls, token: str | None) -> str | None:
        if token is not None:
            kind, _, digest = token.partition("$")
            if kind != "sha256" or len(digest) != 64:
                raise ValueError(
                    "not a sha256 token hash: make one with `insitu-daq web --new-token`"
                )
        return token

    @model_validator(mode="after")
    def _has_credential(self) -> WebUser:
        if self.password is None and self.token is None:
            raise ValueError(f"user {self.name!r} has neither password nor token")
        return self


class WebConfig(_Section):
    """The web live view (`insitu-daq web`, docs/WEB.md)."""

    bind: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    # The analysis process binds it and publishes its previews; the web process connects.
    preview_endpoint: str = "tcp://127.0.0.1:5590"
    preview_rate_hz: Annotated[float, Field(gt=0, le=20)] = 4.0
    public_view: bool = True  # anyone who reaches the page may watch; False: viewers log in
    behind_proxy: bool = False  # served through a TLS-terminating reverse proxy (deploy/)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    users: tuple[WebUser, ...] = ()

    @model_validator(mode="after")
    def _safe_off_loopback(self) -> WebConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise ValueError(f"{missing}: tls_cert and tls_key go together")
        local = is_loopback(f"tcp://{self.bind}:{self.port}")
        if not local and self.tls_cert is None and not self.behind_proxy:
            raise ValueError(
                f"bind={self.bind!r} is not loopback: set tls_cert and tls_key, or "
                "behind_proxy = true for a TLS-terminating proxy (deploy/README.md)"
            )
        names = [user.name for user in self.users]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"users: {name!r} is listed twice")
        return self


class StationConfig(_Section):
    name: str = "station"
    data_dir: Path = Path("runs")
    # Folder of the station locks (core/stationlock.py: one daemon per station). Unset:
    # /run/lock/insitu-daq, shared by every account; $INSITU_DAQ_LOCK_DIR overrides both.
    lock_dir: Path | None = None
    source_meter: SourceMeterConfig = SourceMeterConfig()
    holder: HolderConfig = HolderConfig()
    detector: DetectorConfig = DetectorConfig()
    microscope: MicroscopeConfig = MicroscopeConfig()
    limits: SafetyLimits = SafetyLimits()
    dose: DoseConfig = DoseConfig()
    sampling: SamplingConfig = SamplingConfig()
    retry: RetryConfig = RetryConfig()
    recording: RecordingConfig = RecordingConfig()
    api: ApiConfig = ApiConfig()
    sample: SampleConfig = SampleConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    web: WebConfig = WebConfig()

    @field_validator("lock_dir")
    @classmethod
    def _lock_dir_absolute(cls, lock_dir: Path | None) -> Path | None:
        # Every daemon of the station must find the same folder, wherever it was started.
        if lock_dir is not None and not lock_dir.is_absolute():
            raise ValueError(f"{str(lock_dir)!r} is not an absolute path")
        return lock_dir


def one_line(error: ValidationError, prefix: str = "") -> str:
    """The first validation error as `field.path: message` on one line."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    where = ".".join(part for part in (prefix, location) if part)
    message = first["msg"].replace("Value error, ", "")
    more = len(error.errors()) - 1
    suffix = f" (+{more} more)" if more else ""
    return f"{where}: {message}{suffix}"


def parse_config(data: dict) -> StationConfig:
    try:
        return StationConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(one_line(exc)) from None


def load_config(path: str | Path) -> StationConfig:
    """Read and validate a station TOML file; raises ConfigError with a one-line reason."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib refuses a key given twice, saying where: its line's text names the key.
        text = path.read_text(encoding="utf-8", errors="replace")
        raise ConfigError(f"{path}: not valid TOML: {toml_error(exc, text)}") from None
    config = parse_config(data)
    if not config.data_dir.is_absolute():
        config = config.model_copy(update={"data_dir": (path.parent / config.data_dir)})
    return config
