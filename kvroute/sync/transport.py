"""The sync channel's small interface, and an in-process backend.

A transport moves opaque batches (bytes) between replicas, in one total order
that every reader sees (a replica also reads its own batches back; the applier
skips them):

* ``publish(payload)`` -- append a batch; raises :class:`SyncUnavailable` when the
  channel cannot be reached (the batch is lost: receivers see a sequence gap);
* ``read(timeout_s)`` -- batches appended since the last read, in order, waiting
  up to ``timeout_s`` for the first; raises :class:`SyncUnavailable`;
* ``recent(seconds)`` -- batches appended during the last ``seconds`` (a starting
  replica learns who is alive and what they did lately), and moves the read
  cursor to the end of the channel;
* ``close()``.

Backends: :class:`MemoryTransport` over a :class:`MemoryBus` (tests, one
process; ``bus.down`` simulates an outage) and
:class:`kvroute.sync.redis_transport.RedisTransport` (a Redis/Valkey stream).
Both pass the same conformance suite (``tests/test_sync_transport.py``).
"""
from __future__ import annotations

import threading
import time
from typing import Protocol

from ..kvindex.errors import KVRouteError


class SyncUnavailable(KVRouteError, ConnectionError):
    """The sync channel cannot be reached (the replica routes alone until it returns)."""


class SyncTransport(Protocol):
    def publish(self, payload: bytes) -> None: ...

    def read(self, timeout_s: float) -> list[bytes]: ...

    def recent(self, seconds: float) -> list[bytes]: ...

    def close(self) -> None: ...


class MemoryBus:
    """An in-process channel: an append-only list of (wall time, batch) guarded by a condition."""

    def __init__(self) -> None:
        #: (time.time(), payload) in publish order.
        self.log: list[tuple[float, bytes]] = []
        #: While True every operation raises SyncUnavailable (an outage); the log is kept.
        self.down = False
        self.cond = threading.Condition()

    def transport(self) -> "MemoryTransport":
        return MemoryTransport(self)


class MemoryTransport:
    """One replica's handle on a :class:`MemoryBus` (its own read cursor)."""

    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus
        with bus.cond:
            self._pos = len(bus.log)

    def _check(self) -> None:
        if self.bus.down:
            raise SyncUnavailable("memory bus is down")

    def publish(self, payload: bytes) -> None:
        b = self.bus
        with b.cond:
            self._check()
            b.log.append((time.time(), bytes(payload)))
            b.cond.notify_all()

    def read(self, timeout_s: float) -> list[bytes]:
        b = self.bus
        with b.cond:
            self._check()
            if self._pos >= len(b.log) and timeout_s > 0:
                b.cond.wait(timeout_s)
                self._check()
            out = [p for _, p in b.log[self._pos:]]
            self._pos = len(b.log)
            return out

    def recent(self, seconds: float) -> list[bytes]:
        b = self.bus
        with b.cond:
            self._check()
            cut = time.time() - seconds
            out = [p for t, p in b.log if t >= cut]
            self._pos = len(b.log)
            return out

    def close(self) -> None:
        pass
