"""Per-worker health of the sidecar: when the router is blind to a worker's cache, say so.

The exact index is only as good as the event stream behind it.  :class:`HealthMonitor`
looks at every followed stream (through the event source's ``stream_status()``) and at
the routing decisions the service reports (:meth:`HealthMonitor.note_routed`), and gives
each worker a list of *reasons* (:data:`REASONS`):

* ``never_connected`` -- the SUB socket never connected (ZMQ socket monitor) within
  ``connect_grace_s`` of the subscription;
* ``disconnected``    -- it was connected and has been disconnected for ``connect_grace_s``;
* ``silent``          -- requests were routed to the worker and no message of its stream
  arrived for ``silence_s`` since the first of them (an engine that computes a prompt
  announces blocks; an idle worker's silence is normal and never reported);
* ``block_size_mismatch`` -- the engine's last stored blocks had another block size than
  the router's, so every one of them was dropped;
* ``unverified``      -- entries kept from before this subscription (a re-added worker, a
  snapshot restored without usable positions) still await the engine's replay;
* ``stale``           -- events were lost; the index holds a subset of the worker's cache.

Any reason makes ``/health`` (and the ``health`` op) ``degraded`` with
``reasons = {worker: [reason, ...]}``.  A reason appearing is logged once as a WARNING,
its clearing as INFO.  For every reason but ``stale`` (a subset never over-predicts) the
router stops crediting the worker's cache (:meth:`Router.set_cache_credited`) until it
clears; the worker stays routable by load.

Who touches what: the service calls :meth:`note_routed` on each decision (two dict reads);
:meth:`check` runs from the serve loop about once a second and from each health request,
under the monitor's own lock; it only reads the event source and calls router methods.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..router import Router

log = logging.getLogger("kvroute.sidecar")

#: reason -> (the router stops crediting the worker's cache, what it means for an operator).
REASONS: dict[str, tuple[bool, str]] = {
    "never_connected": (True, "its KV-event endpoint never connected"),
    "disconnected": (True, "its KV-event connection dropped"),
    "silent": (True, "no KV event arrived since requests were routed to it"),
    "block_size_mismatch": (True, "its engine's block size differs from the router's, so every stored block is dropped"),
    "unverified": (True, "index entries from before this subscription await the engine's replay"),
    "stale": (False, "KV events were lost; the index holds a subset of its cache until events rebuild it"),
}


def follow_stream_health(router: Router, stale: set[Any], with_events: set[Any]) -> list[tuple[Any, bool]]:
    """``approximate = auto`` (sidecar and proxy alike): a worker with no KV-event stream, or whose stream
    is stale, is predicted from the router's own decisions (approximate mode); once fresh events rebuild
    it, the index alone is trusted again and its predicted entries go.  ``stale`` and ``with_events`` name
    workers by their key or, for data-parallel ranks ``(id, rank)``, by their id.  Returns the switches
    made, ``(worker, approximate)``."""
    approx = set(router.approximate_workers())
    made = []
    for w in router.workers():
        base = w[0] if isinstance(w, tuple) else w
        want = w in stale or base in stale or base not in with_events
        if want != (w in approx):
            router.set_approximate(w, want)
            made.append((w, want))
            log.log(logging.WARNING if want else logging.INFO,
                    "worker %s: %s", w, "approximate mode (its cache is predicted from routing decisions)"
                    if want else "KV events current again: approximate mode off")
    return made


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Thresholds of :class:`HealthMonitor` (seconds)."""

    #: A worker routed to and silent this long since is ``silent``.
    silence_s: float = 30.0
    #: An endpoint not connected this long after the subscription (or after a disconnect) is reported.
    connect_grace_s: float = 10.0
    #: The serve loop runs :meth:`HealthMonitor.check` at most this often.
    check_interval_s: float = 1.0


class HealthMonitor:
    """Reasons per worker, their logging, and the router's cache credit (module docstring)."""

    def __init__(self, router: Router, events: Any, config: HealthConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        #: The router whose cache credit is switched.
        self.router = router
        #: The event source (``stream_status()``, ``last_received(key)``), or None.
        self.events = events
        #: Thresholds.
        self.config = config or HealthConfig()
        self._clock = clock
        self._lock = threading.Lock()
        #: worker -> clock() of the earliest routing decision no event has answered yet.
        self._unanswered: dict[Any, float] = {}
        #: worker -> reasons found by the last check (only workers with reasons).
        self._reasons: dict[Any, list[str]] = {}
        self._next_check = 0.0

    def note_routed(self, worker: Any) -> None:
        """A request was routed to ``worker`` (called on every decision: two dict reads)."""
        ev = self.events
        if ev is None:
            return
        u = self._unanswered.get(worker)
        if u is None:
            self._unanswered[worker] = self._clock()
            return
        last = ev.last_received(worker)
        if last is not None and last >= u:  # answered since: the silence clock restarts here
            self._unanswered[worker] = self._clock()

    def tick(self) -> None:
        """Run :meth:`check` if ``check_interval_s`` passed since the last one (serve loop)."""
        if self._clock() >= self._next_check:
            self.check()

    def check(self) -> dict[Any, list[str]]:
        """Recompute every worker's reasons, log transitions, switch cache credit; returns {worker: reasons}."""
        with self._lock:
            cfg = self.config
            now = self._clock()
            self._next_check = now + cfg.check_interval_s
            status = self.events.stream_status() if self.events is not None else {}
            out: dict[Any, list[str]] = {}
            for key, s in status.items():
                rs = []
                if s["monitored"] and not s["ever_connected"] and now - s["added_at"] > cfg.connect_grace_s:
                    rs.append("never_connected")
                elif not s["connected"] and s["disconnected_at"] is not None \
                        and now - s["disconnected_at"] > cfg.connect_grace_s:
                    rs.append("disconnected")
                else:
                    u = self._unanswered.get(key)
                    last = s["last_rx"]
                    if u is not None and (last is None or last < u) and now - u > cfg.silence_s:
                        rs.append("silent")
                for flag in ("block_size_mismatch", "unverified", "stale"):
                    if s[flag]:
                        rs.append(flag)
                if rs:
                    out[key] = rs
            for key in [k for k in self._unanswered if k not in status]:
                del self._unanswered[key]
            for key in set(out) | set(self._reasons):
                old, new = self._reasons.get(key, []), out.get(key, [])
                if old == new:
                    continue
                for r in new:
                    if r not in old:
                        log.warning("worker %r: %s (%s)%s", key, r, REASONS[r][1],
                                    "; its cached blocks are not credited until this clears" if REASONS[r][0] else "")
                for r in old:
                    if r not in new:
                        log.info("worker %r: %s cleared", key, r)
                credited = not any(REASONS[r][0] for r in new)
                if credited != (not any(REASONS[r][0] for r in old)):
                    self.router.set_cache_credited(key, credited)
            self._reasons = out
            return {k: list(v) for k, v in out.items()}

    def reasons(self) -> dict[Any, list[str]]:
        """The reasons found by the last :meth:`check` (no new check)."""
        with self._lock:
            return {k: list(v) for k, v in self._reasons.items()}

    def health(self) -> dict[str, Any]:
        """The ``/health`` document: ``down`` without a healthy worker, ``degraded`` with any reason, else ``ok``."""
        reasons = self.check()
        return health_doc(self.router, self.events, reasons)


def health_doc(router: Router, events: Any, reasons: dict[Any, list[str]] | None = None) -> dict[str, Any]:
    """``status`` (ok / degraded / down), worker counts, ``stale_workers`` and per-worker ``reasons``."""
    healthy = router.healthy_workers()
    stale = sorted(map(str, events.stale_workers())) if events is not None else []
    reasons = reasons or {}
    if not healthy:
        status = "down"
    elif stale or reasons:
        status = "degraded"
    else:
        status = "ok"
    return {"status": status, "healthy_workers": len(healthy), "workers": len(router.workers()),
            "stale_workers": stale, "reasons": {(k if isinstance(k, (str, int)) else str(k)): v
                                                for k, v in reasons.items()}}
