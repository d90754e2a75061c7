"""``SyncRunner``: drives a :class:`ReplicaSync` over a transport with two threads (the sidecar's use).

* publisher: woken by a queued op (``ReplicaSync.wakeup``), waits ``linger_s``
  so that the ops of that moment leave as one batch, publishes; sends a
  heartbeat every ``heartbeat_s`` otherwise;
* reader: reads batches (blocking ``read`` of ``poll_s``), applies them, and
  expires silent peers (``tick``); after a read it waits ``linger_s`` too, so
  that one read takes what several peers published meanwhile.

``linger_s`` (1 ms) trades that much sync delay for fewer round trips to the
server: each is ~40-150 us of this process's CPU (redis-py with hiredis), taken
from the thread that routes.

Catch-up (:meth:`start`, before the sidecar answers): read the last
``lease_s`` of the channel (who is alive, what they did lately), ask every
peer for its state (with the approximate entries), and wait until each live
peer's state arrived or ``catch_up_s`` passed.

Outage: when the channel cannot be reached the replica keeps routing alone;
:meth:`health_reasons` says so; peers' load is released (it can no longer be
kept current); batches meanwhile are dropped (counted).  When it returns the
replica publishes its own state and asks for everyone's (resync).

Who touches what: the two threads own the transport calls; ``connected``,
``down_reason`` and ``down_since`` are written under ``_state_lock`` and read
by health.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from .replica import ReplicaSync
from .transport import SyncTransport, SyncUnavailable

log = logging.getLogger("kvroute.sync")


class SyncRunner:
    def __init__(self, sync: ReplicaSync, transport: SyncTransport, *, poll_s: float = 0.05,
                 catch_up_s: float = 3.0, retry_s: float = 0.25, linger_s: float = 0.001,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sync = sync
        self.transport = transport
        self.poll_s = poll_s
        self.catch_up_s = catch_up_s
        self.retry_s = retry_s
        self.linger_s = linger_s
        self._clock = clock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._state_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        #: Whether the channel answered the last call.
        self.connected = False
        #: Why it did not (an error message), and since when (local clock), while disconnected.
        self.down_reason = "not started"
        self.down_since: float | None = None
        #: Whether the start-up catch-up saw every live peer's state.
        self.caught_up = False
        #: Peers whose state the catch-up waited for.
        self.catch_up_peers = 0
        #: Batches published / dropped while the channel was down; outages seen.
        self.published = 0
        self.dropped = 0
        self.outages = 0
        sync.wakeup = self._wake.set

    # ------------------------------------------------------------------ state
    def _up(self) -> None:
        with self._state_lock:
            was = self.connected
            self.connected = True
            self.down_reason = ""
            self.down_since = None
        if not was:
            # back (or first contact): tell peers what we carry, ask for theirs
            self.sync.queue_state()
            self.sync.queue_query()
            log.info("replica sync: channel reachable; resyncing")

    def _down(self, exc: Exception) -> None:
        with self._state_lock:
            was = self.connected
            self.connected = False
            self.down_reason = str(exc)
            if was or self.down_since is None:
                self.down_since = self._clock()
        if was:
            self.outages += 1
            n = self.sync.forget_peers()
            log.warning("replica sync unavailable (%s): routing alone; released %d peer requests", exc, n)

    def health_reasons(self) -> list[str]:
        with self._state_lock:
            if self.connected:
                return []
            since = "" if self.down_since is None else f" for {self._clock() - self.down_since:.1f} s"
            return [f"replica sync unreachable{since} ({self.down_reason}): routing alone"]

    def stats(self) -> dict[str, Any]:
        with self._state_lock:
            out = {"connected": self.connected, "down_reason": self.down_reason, "caught_up": self.caught_up,
                   "published": self.published, "dropped": self.dropped, "outages": self.outages}
        out.update(self.sync.stats())
        return out

    # ------------------------------------------------------------------ start
    def start(self) -> "SyncRunner":
        """Catch up (bounded by ``catch_up_s``), then start the threads.  Never raises on an outage."""
        s = self.sync
        try:
            now = self._clock()
            for p in self.transport.recent(s.lease_s):
                s.receive(p, now)
            s.tick(now)
            live = set(s.peers)
            self.catch_up_peers = len(live)
            with self._state_lock:
                self.connected = True
                self.down_reason = ""
            s.queue_query(approx=True)
            s.queue_state()
            self._flush()
            deadline = self._clock() + self.catch_up_s
            while live and self._clock() < deadline:
                for p in self.transport.read(min(self.poll_s, max(0.001, deadline - self._clock()))):
                    s.receive(p)
                self._flush()
                if all(o not in s.peers or s.peers[o].has_state for o in live):
                    break
            self.caught_up = all(o not in s.peers or s.peers[o].has_state for o in live)
            s.reset_delay()
            if not self.caught_up:
                log.warning("replica sync: catch-up incomplete after %.1f s", self.catch_up_s)
        except SyncUnavailable as exc:  # start anyway: the reader retries, and resyncs when it returns
            self._down(exc)
        for fn, name in ((self._publish_loop, "kvroute-sync-pub"), (self._read_loop, "kvroute-sync-read")):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _flush(self) -> None:
        s = self.sync
        while True:
            b = s.take_batch()
            if b is None:
                return
            self.transport.publish(b)
            self.published += 1

    # ------------------------------------------------------------------ loops
    def _publish_loop(self) -> None:
        s = self.sync
        while not self._stop.is_set():
            if self._wake.wait(s.heartbeat_s / 2) and self.linger_s > 0:
                self._stop.wait(self.linger_s)
            self._wake.clear()
            if not self.connected:
                while s.take_batch() is not None:  # routing goes on alone: these are lost (peers resync later)
                    self.dropped += 1
                continue
            try:
                self._flush()
            except SyncUnavailable as exc:
                self.dropped += 1
                self._down(exc)

    def _read_loop(self) -> None:
        s = self.sync
        while not self._stop.is_set():
            try:
                batches = self.transport.read(self.poll_s)
            except SyncUnavailable as exc:
                self._down(exc)
                self._stop.wait(self.retry_s)
                continue
            if not self.connected:
                self._up()
            now = self._clock()
            for p in batches:
                s.receive(p, now)
            s.tick(now)
            if batches and self.linger_s > 0:
                self._stop.wait(self.linger_s)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        self.transport.close()
