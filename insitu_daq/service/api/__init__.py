"""The daemon's control API (ZeroMQ REP) and event stream (ZeroMQ PUB), as DESIGN.md fixes them.

requests.py: the command schema and validation; server.py: the REP server calling the
daemon's `ControlHandler`; client.py: `ControlClient`; events.py: the PUB stream and
`EventSubscriber`; curve.py: loopback by default, CURVE keys otherwise; wire.py: the JSON and
default endpoints both ends share; errors.py.

The names a user of a running daemon imports are re-exported here.
"""

from insitu_daq.service.api.client import ControlClient
from insitu_daq.service.api.errors import ApiError, ControlError, ControlTimeoutError
from insitu_daq.service.api.events import EventSubscriber

__all__ = ["ApiError", "ControlClient", "ControlError", "ControlTimeoutError", "EventSubscriber"]
