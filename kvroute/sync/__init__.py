"""Active-active router replicas: what one replica decides, the others learn (top floor).

Map of the parts (this package imports the router's public API and kvindex
errors only; nothing below the top floor imports it):

* :mod:`.messages`        -- the wire format of a sync batch and its validation.
* :mod:`.replica`         -- :class:`ReplicaSync`: router observer + applier of peers'
  batches (in-flight load, speculative prefixes, approximate entries), leases, gaps.
* :mod:`.transport`       -- the channel interface, :class:`MemoryBus` (in-process).
* :mod:`.redis_transport` -- :class:`RedisTransport`: one Redis/Valkey stream.
* :mod:`.runner`          -- :class:`SyncRunner`: the sidecar's threads, catch-up, outages.

See docs/replicas.md for the design and the choice of Redis streams.
"""
from .messages import SyncMessageError
from .replica import ReplicaSync
from .runner import SyncRunner
from .transport import MemoryBus, MemoryTransport, SyncTransport, SyncUnavailable


def make_transport(url: str, **kw):  # noqa: ANN001, ANN201 - small factory
    """A transport for a URL: ``redis://`` / ``rediss://`` / ``unix://`` (Redis or Valkey)."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis_transport import RedisTransport

        return RedisTransport(url, **kw)
    raise ValueError(f"unsupported replica-sync URL {url!r} (want redis://host:port/db)")


__all__ = ["ReplicaSync", "SyncRunner", "SyncMessageError", "MemoryBus", "MemoryTransport", "SyncTransport",
           "SyncUnavailable", "make_transport"]
