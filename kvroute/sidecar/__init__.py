"""``kvroute serve``: the routing sidecar (top floor).

Map of the parts:

* :mod:`.config`  -- :class:`SidecarConfig` from TOML/JSON and flags.
* :mod:`.service` -- request handlers (msgpack in, msgpack out; never raises).
* :mod:`.server`  -- :class:`SidecarServer`: ZMQ ROUTER loop, snapshot, lifecycle.
* :mod:`.events`  -- the KV-event subscriber, sharing the router's lock.
* :mod:`.metrics` -- Prometheus registry, ``/metrics`` and ``/health``.
* :mod:`.client`  -- :class:`KVRouteClient`, a small synchronous client.
* :mod:`.errors`  -- typed errors and their wire names.
* :mod:`.cli`     -- the click command.
"""
from .client import KVRouteClient
from .config import SidecarConfig, WorkerConfig
from .errors import BadRequestError, RemoteError, SidecarError, SidecarTimeoutError, UnknownOpError

__all__ = ["KVRouteClient", "SidecarConfig", "WorkerConfig", "SidecarError", "BadRequestError", "UnknownOpError",
           "RemoteError", "SidecarTimeoutError"]
