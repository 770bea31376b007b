"""Who may talk to the daemon: loopback by default, CURVE keys for anything else.

Binding anywhere but loopback needs CURVE keys (a secret key file loaded with `zmq.auth`, and
optionally a folder of the client public keys allowed in). `server_keys` refuses a
non-loopback endpoint without keys when a server is constructed, before the daemon touches
any instrument, even if the config check was bypassed. `BoundSocket` is a server socket with
its own context (and ZAP authenticator when clients are listed).
"""

from __future__ import annotations

import logging
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from insitu_daq.core.config import ConfigError, is_loopback
from insitu_daq.service.api.errors import ApiError
from insitu_daq.service.api.wire import squash

log = logging.getLogger(__name__)


class CurveServerKeys:
    """The server's CURVE key pair, and optionally the folder of client public keys let in."""

    def __init__(self, public: bytes, secret: bytes, clients_dir: Path | None = None) -> None:
        self.public = public
        self.secret = secret
        self.clients_dir = clients_dir

    @classmethod
    def load(cls, secret_key_file: Path, clients_dir: Path | None = None) -> CurveServerKeys:
        """Read a `zmq.auth` secret certificate; raises ConfigError with a one-line reason."""
        try:
            public, secret = zmq.auth.load_certificate(secret_key_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(squash(f"curve_secret_key_file {secret_key_file}: {exc}")) from None
        if not secret:
            raise ConfigError(
                f"curve_secret_key_file {secret_key_file}: holds no secret key (a .key_secret file)"
            )
        if clients_dir is not None and not Path(clients_dir).is_dir():
            raise ConfigError(f"curve_clients_dir {clients_dir}: not a directory")
        return cls(public, secret, None if clients_dir is None else Path(clients_dir))


def server_keys(
    name: str, endpoint: str, secret_key_file: Path | None, clients_dir: Path | None
) -> CurveServerKeys | None:
    """The CURVE keys a server on `endpoint` must use; refuses non-loopback without keys."""
    if secret_key_file is None:
        if not is_loopback(endpoint):
            raise ConfigError(
                f"{name} endpoint {endpoint!r} is not loopback: set curve_secret_key_file"
            )
        if clients_dir is not None:
            raise ConfigError("curve_clients_dir needs curve_secret_key_file")
        return None
    return CurveServerKeys.load(Path(secret_key_file), clients_dir)


def curve_client(
    socket: zmq.Socket, server_public_key_file: Path | None, client_secret_key_file: Path | None
) -> None:
    """Make `socket` a CURVE client of the server whose public certificate is given."""
    if server_public_key_file is None:
        if client_secret_key_file is not None:
            raise ConfigError("a client key needs the server's public key file")
        return
    server_public, _ = zmq.auth.load_certificate(server_public_key_file)
    if client_secret_key_file is None:  # the server admits any client: an ephemeral pair does
        public, secret = zmq.curve_keypair()
    else:
        public, secret = zmq.auth.load_certificate(client_secret_key_file)
        if not secret:
            raise ConfigError(f"{client_secret_key_file}: holds no secret key")
    socket.curve_serverkey = server_public
    socket.curve_publickey = public
    socket.curve_secretkey = secret


class BoundSocket:
    """A server socket bound with its own context (and ZAP authenticator if clients are listed)."""

    def __init__(self, kind: int, name: str, endpoint: str, keys: CurveServerKeys | None) -> None:
        self.context = zmq.Context()
        self.authenticator: ThreadAuthenticator | None = None
        self.socket: zmq.Socket | None = None
        try:
            if keys is not None and keys.clients_dir is not None:
                self.authenticator = ThreadAuthenticator(self.context, log=log)
                self.authenticator.start()
                self.authenticator.configure_curve(domain="*", location=str(keys.clients_dir))
            self.socket = self.context.socket(kind)
            self.socket.linger = 0
            if keys is not None:
                self.socket.curve_secretkey = keys.secret
                self.socket.curve_publickey = keys.public
                self.socket.curve_server = True
                if keys.clients_dir is None:
                    log.warning("%s: CURVE without curve_clients_dir admits any client", name)
            self.socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise ApiError(f"cannot bind {name} endpoint {endpoint}: {exc}") from None
        except BaseException:
            self.close()
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
        self.context.term()
