"""``ReplicaSync``: one router replica's side of active-active sync, transport-free.

It is a :class:`kvroute.router.Router` observer (it hears every decision and
release of its own router) and an applier (it feeds other replicas' batches
into its router through the router's public methods only:
``track_remote``/``release_remote``, ``add_pending``, ``add_approx``/``approx_load``).
It never touches a socket: :meth:`take_batch` gives the next payload to
publish, :meth:`receive` takes one payload read from the shared channel, and
:meth:`tick` expires silent peers.  The sidecar drives it from threads
(:mod:`kvroute.sync.runner`); the simulator calls it on its simulated clock.

Guarantees (see docs/replicas.md):

* **No double counting.** A remote request is keyed ``(origin, request id)``;
  a batch whose sequence number was seen is dropped whole, a route already
  tracked is ignored, a release of an unknown request is counted and ignored.
* **Nothing lost for good.** A gap in an origin's sequence (lost batches, a
  replica that joined late) makes this replica ask that origin for its state
  (op ``q``); a state (op ``s``) *replaces* everything known of that origin.
* **Dead replicas' load expires.** An origin silent for ``lease_s`` (no batch,
  not even a heartbeat) has all its requests released; each request also
  carries its own deadline (the origin's ``request_ttl_s``).
* **Bad input never crashes.** Malformed batches and ops are counted
  (``counters``) and logged, valid ops of the same batch still apply.

Who touches what: the router calls ``on_route``/``on_release`` under its lock
(they only append to a deque); ``take_batch`` runs on the publisher side,
``receive``/``tick``/``catch-up`` on the reader side, both holding the router's
lock while they apply.  ``counters`` and ``peers`` are read by metrics and health.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter, deque
from typing import Any, Callable

from ..kvindex.errors import KVRouteError
from . import messages as m

log = logging.getLogger("kvroute.sync")


class _Peer:
    """What this replica knows of one other replica incarnation (owned by ReplicaSync)."""

    __slots__ = ("origin", "seq", "last_seen", "requests", "has_state")

    def __init__(self, origin: str, now: float) -> None:
        #: ``name/incarnation`` of the peer.
        self.origin = origin
        #: Highest batch sequence number applied.
        self.seq = 0
        #: Local clock time of its last batch.
        self.last_seen = now
        #: Its request ids whose load this replica tracks (a subset of the router's remote keys).
        self.requests: set[Any] = set()
        #: Whether a full state of it was applied (catch-up is complete for it).
        self.has_state = False


class ReplicaSync:
    """See the module docstring.  ``name``: this replica's stable name (host:port, pod name);
    ``lease_s``: silence after which a peer's load is released; ``heartbeat_s``: longest gap
    between this replica's own batches (an empty one is a heartbeat)."""

    def __init__(self, router: Any, name: str, *, clock: Callable[[], float] = time.monotonic,
                 lease_s: float = 3.0, heartbeat_s: float = 0.5, incarnation: str | None = None,
                 max_ops_per_batch: int = 4096, wall: Callable[[], float] = time.time) -> None:
        if not lease_s > 0 or not heartbeat_s > 0 or heartbeat_s >= lease_s:
            raise ValueError("need 0 < heartbeat_s < lease_s")
        self.router = router
        #: This incarnation's origin name on the wire.
        self.origin = f"{name}/{incarnation or os.urandom(4).hex()}"
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self.max_ops_per_batch = max_ops_per_batch
        self._clock = clock
        self._wall = wall
        #: Publish-to-apply delay of peers' batches (wall clocks of both ends): count, sum, max seconds.
        self.delay_count = 0
        self.delay_sum = 0.0
        self.delay_max = 0.0
        self._out: deque[Any] = deque()
        self._seq = 0
        self._last_sent = -math.inf
        #: {origin: _Peer} of live peers.
        self.peers: dict[str, _Peer] = {}
        #: Counted events: batches_in/out, ops_in, duplicate_batches, malformed_batches, malformed_ops,
        #: duplicate_routes, unknown_releases, unknown_workers, gaps, states_applied, lease_expired_requests ...
        self.counters: Counter[str] = Counter()
        #: Called after an op is queued (the runner wakes its publisher); None in the simulator.
        self.wakeup: Callable[[], None] | None = None
        self._lock = threading.Lock()  # take_batch vs. queue_state's ordering of the deque
        # every reader also reads its own batches back: recognise them by their first bytes, undecoded
        self._own_prefix = m.batch_prefix(self.origin)
        #: Wall times of this replica's recent decisions (the last ``_BLIND_KEEP_S``), and the decayed sums
        #: behind ``router.view_unseen``: peers' decisions this replica's decisions did not see, and its
        #: decisions (``_blind_update``).
        self._own_times: deque[float] = deque()
        self._blind = 0.0
        self._decided = 0.0
        self._blind_at: float | None = None
        router.add_observer(self)

    # ----------------------------------------------------------- own decisions
    def on_route(self, rec: Any) -> None:
        self._out.append(rec)
        self._blind_update(1, 0, self._wall())
        if self.wakeup is not None:
            self.wakeup()

    def on_release(self, request_id: Any, prefill_only: bool) -> None:
        self._out.append((m.PREFILL_DONE if prefill_only else m.FINISH, request_id))
        if self.wakeup is not None:
            self.wakeup()

    def queue_state(self, *, approx: bool = False) -> None:
        """Queue this replica's full state (its live requests; with ``approx`` its approximate entries),
        in order with its decisions (taken under the router's lock, where decisions are queued)."""
        r = self.router
        with r.lock:
            flights = r.local_flights()
            self._out.append((m.STATE, flights))
            if approx:
                for w in r.approximate_workers():
                    self._out.append((m.APPROX, w, r.approx_dump(w)))
        if self.wakeup is not None:
            self.wakeup()

    def queue_query(self, target: str | None = None, *, approx: bool = False) -> None:
        """Ask ``target`` (None: every peer) for its state."""
        self._out.append((m.QUERY, target, approx))
        if self.wakeup is not None:
            self.wakeup()

    def has_output(self) -> bool:
        return bool(self._out)

    def take_batch(self, now: float | None = None) -> bytes | None:
        """The next batch to publish (queued ops, or a heartbeat when one is due), else None."""
        now = self._clock() if now is None else now
        ops: list[list[Any]] = []
        out = self._out
        with self._lock:
            while out and len(ops) < self.max_ops_per_batch:
                ops.append(_encode(out.popleft()))
            if not ops:
                if now - self._last_sent < self.heartbeat_s:
                    return None
                ops.append([m.HEARTBEAT])
            self._seq += 1
            self._last_sent = now
            self.counters["batches_out"] += 1
            return m.encode_batch(self.origin, self._seq, ops, self._wall())

    # ----------------------------------------------------------- others' decisions
    def receive(self, payload: Any, now: float | None = None) -> None:
        """Apply one batch read from the channel (never raises; bad input is counted)."""
        if isinstance(payload, bytes) and payload.startswith(self._own_prefix):
            return
        now = self._clock() if now is None else now
        try:
            origin, seq, ops, sent = m.decode_batch(payload)
        except m.SyncMessageError as exc:
            self.counters["malformed_batches"] += 1
            log.warning("dropping a malformed sync batch: %s", exc)
            return
        if origin == self.origin:
            return
        p = self.peers.get(origin)
        if p is None:
            p = self.peers[origin] = _Peer(origin, now)
            self.counters["peers_joined"] += 1
        elif seq <= p.seq:
            self.counters["duplicate_batches"] += 1
            return
        gap = seq != p.seq + 1
        p.seq = seq
        p.last_seen = now
        self.counters["batches_in"] += 1
        r = self.router
        with r.lock:
            for op in ops:
                try:
                    self._apply(p, op)
                except (m.SyncMessageError, ValueError, TypeError, IndexError, KVRouteError) as exc:
                    self.counters["malformed_ops"] += 1
                    log.warning("skipping a bad sync op from %s: %s", origin, exc)
        self.counters["ops_in"] += len(ops)
        if sent is not None:
            routes = sum(1 for op in ops if isinstance(op, list) and op and op[0] == m.ROUTE)
            if routes:
                # this replica's decisions since the peer published them were made without them
                wall = self._wall()
                blind = sum(1 for t in self._own_times if sent <= t < wall)
                self._blind_update(0, routes * blind, wall)
            d = max(0.0, self._wall() - sent)
            self.delay_count += 1
            self.delay_sum += d
            if d > self.delay_max:
                self.delay_max = d
        if gap:  # batches of this origin were missed (lost, or published before this replica listened)
            self.counters["gaps"] += 1
            p.has_state = False
            self.queue_query(origin)

    def _blind_update(self, decided: int, blind: int, wall: float) -> None:
        """Count own decisions and peers' decisions they missed; set ``router.view_unseen`` to the mean number
        of peers' decisions an own decision missed, exponentially weighted over ``_BLIND_WINDOW_S``.

        A peer's decision published at ``sent`` reaches this replica a sync delay later; every decision
        this replica made from ``sent`` until then (strictly before now: with no delay at all, a decision
        of the same instant came first) did not see it.  With arrivals spread in time the mean
        is about rate x delay (near 0 for a few ms); with simultaneous arrivals (a trace with whole-second
        timestamps, a burst) it is the number of peers' decisions in the same instant."""
        last = self._blind_at
        if last is not None and wall > last:
            k = math.exp(-(wall - last) / _BLIND_WINDOW_S)
            self._blind *= k
            self._decided *= k
        if last is None or wall > last:
            self._blind_at = wall
        if decided:
            self._decided += decided
            own = self._own_times
            own.append(wall)
            while own and own[0] < wall - _BLIND_KEEP_S:
                own.popleft()
        self._blind += blind
        if self._decided > 0:
            self.router.view_unseen = self._blind / self._decided

    def _apply(self, p: _Peer, op: Any) -> None:
        if not isinstance(op, list) or not op:
            raise m.SyncMessageError("an op is a non-empty array")
        kind = op[0]
        fn = _APPLY.get(kind) if isinstance(kind, str) else None
        if fn is None:
            raise m.SyncMessageError(f"unknown op {kind!r}")
        fn(self, p, op)

    def _op_route(self, p: _Peer, op: list) -> None:
        _, rid, w, dw, pt, nb, ttl, raw, flags = op
        rid, w = m.request_id(rid), m.worker_id(w)
        dw = None if dw is None else m.worker_id(dw)
        pt, nb, ttl = m.count(pt, "prefill tokens"), m.count(nb, "blocks"), m.seconds(ttl, "ttl")
        flags = m.count(flags, "flags")
        hs = m.unpack_hashes(raw)
        r = self.router
        try:
            added = r.track_remote((p.origin, rid), w, prefill_tokens=pt, blocks=nb, ttl_s=ttl, decode_worker=dw,
                                   hashes=hs)
        except KVRouteError:  # a worker this replica does not know (yet): its load cannot count here
            self.counters["unknown_workers"] += 1
            return
        if not added:
            self.counters["duplicate_routes"] += 1
            return
        p.requests.add(rid)
        if hs:
            if flags & m.FLAG_PENDING:
                r.add_pending(w, hs)
            if flags & m.FLAG_APPROX:
                r.add_approx(w, hs)

    def _op_release(self, p: _Peer, op: list) -> None:
        kind, rid = op[0], m.request_id(op[1])
        prefill_only = kind == m.PREFILL_DONE
        if not self.router.release_remote((p.origin, rid), prefill_only=prefill_only):
            self.counters["unknown_releases"] += 1
        if not prefill_only:
            p.requests.discard(rid)

    def _op_heartbeat(self, p: _Peer, op: list) -> None:
        pass

    def _op_state(self, p: _Peer, op: list) -> None:
        flights = op[1]
        if not isinstance(flights, list):
            raise m.SyncMessageError("a state is an array of requests")
        r = self.router
        parsed = {}
        for f in flights:
            if not isinstance(f, list) or len(f) != 7:
                raise m.SyncMessageError("a state request has 7 fields")
            rid, w, dw, pt, nb, open_, ttl = f
            parsed[m.request_id(rid)] = (m.worker_id(w), None if dw is None else m.worker_id(dw),
                                         m.count(pt, "prefill tokens"), m.count(nb, "blocks"), bool(open_),
                                         m.seconds(ttl, "ttl"))
        for rid in list(p.requests):
            if rid not in parsed:
                r.release_remote((p.origin, rid))
                p.requests.discard(rid)
        for rid, (w, dw, pt, nb, open_, ttl) in parsed.items():
            key = (p.origin, rid)
            if rid in p.requests and (open_ or r.release_remote(key, prefill_only=True)):
                continue  # known (a closed prefill released: idempotent)
            try:
                if r.track_remote(key, w, prefill_tokens=pt, blocks=nb, ttl_s=ttl, decode_worker=dw,
                                  prefill_open=open_, new_decision=False):
                    p.requests.add(rid)
            except KVRouteError:
                self.counters["unknown_workers"] += 1
        p.has_state = True
        self.counters["states_applied"] += 1

    def _op_query(self, p: _Peer, op: list) -> None:
        target = op[1] if len(op) > 1 else None
        if target is None or target == self.origin:
            self.queue_state(approx=bool(op[2]) if len(op) > 2 else False)

    def _op_approx(self, p: _Peer, op: list) -> None:
        _, w, entries = op
        w = m.worker_id(w)
        if not isinstance(entries, list):
            raise m.SyncMessageError("approximate entries are an array")
        good = []
        for e in entries:
            if not isinstance(e, list) or len(e) != 2 or type(e[0]) is not int or not 0 <= e[0] < 1 << 64:
                raise m.SyncMessageError("an approximate entry is [u64 hash, seconds left]")
            left = m.seconds(e[1], "seconds left")
            if left is not None and left > 0:
                good.append((e[0], left))
        try:
            self.router.approx_load(w, good)
        except KVRouteError:
            self.counters["unknown_workers"] += 1

    def reset_delay(self) -> None:
        """Forget the delay figures (after a catch-up, whose replayed batches are old by design)."""
        self.delay_count, self.delay_sum, self.delay_max = 0, 0.0, 0.0

    # ----------------------------------------------------------- liveness
    def tick(self, now: float | None = None) -> int:
        """Release the load of peers silent for ``lease_s``; returns how many requests went."""
        now = self._clock() if now is None else now
        gone = [p for p in self.peers.values() if now - p.last_seen > self.lease_s]
        n = 0
        if gone:
            r = self.router
            with r.lock:
                for p in gone:
                    for rid in p.requests:
                        n += r.release_remote((p.origin, rid))
                    del self.peers[p.origin]
                    log.warning("replica %s silent for %.1f s: released its %d requests", p.origin,
                                now - p.last_seen, len(p.requests))
            self.counters["peers_expired"] += len(gone)
            self.counters["lease_expired_requests"] += n
        return n

    def forget_peers(self) -> int:
        """Release every peer's load now (this replica is cut off from the channel and routes alone)."""
        n = 0
        with self.router.lock:
            for p in self.peers.values():
                for rid in p.requests:
                    n += self.router.release_remote((p.origin, rid))
            self.peers.clear()
        return n

    def stats(self, now: float | None = None) -> dict[str, Any]:
        now = self._clock() if now is None else now
        return {
            "origin": self.origin,
            "peers": {o: {"silent_s": round(now - p.last_seen, 3), "requests": len(p.requests),
                          "has_state": p.has_state} for o, p in self.peers.items()},
            "queued_ops": len(self._out),
            "delay_seconds_count": self.delay_count, "delay_seconds_sum": self.delay_sum,
            "delay_seconds_max": self.delay_max,
            **self.counters,
        }


#: Averaging window of ``Router.view_unseen``, seconds; own decisions older than ``_BLIND_KEEP_S`` are not kept
#: (a peer's batch later than that is no blind spot: its lease is nearly over).
_BLIND_WINDOW_S = 30.0
_BLIND_KEEP_S = 5.0

_APPLY: dict[str, Callable[[ReplicaSync, _Peer, list], None]] = {
    m.ROUTE: ReplicaSync._op_route,
    m.PREFILL_DONE: ReplicaSync._op_release,
    m.FINISH: ReplicaSync._op_release,
    m.HEARTBEAT: ReplicaSync._op_heartbeat,
    m.STATE: ReplicaSync._op_state,
    m.QUERY: ReplicaSync._op_query,
    m.APPROX: ReplicaSync._op_approx,
}


def _wire_worker(w: Any) -> Any:
    return list(w) if isinstance(w, tuple) else w


def _encode(item: Any) -> list[Any]:
    """One queued item (a FlightRecord, or a tuple queued by this module) as a wire op."""
    if isinstance(item, tuple) and not hasattr(item, "_fields"):
        kind = item[0]
        if kind == m.STATE:
            return [m.STATE, [[f.request_id, _wire_worker(f.worker), _wire_worker(f.decode_worker), f.prefill_tokens,
                               f.blocks, f.prefill_open, f.ttl_s] for f in item[1]]]
        if kind == m.APPROX:
            return [m.APPROX, _wire_worker(item[1]), [[h, left] for h, left in item[2]]]
        return list(item)
    rec = item
    flags = (m.FLAG_PENDING if rec.pending else 0) | (m.FLAG_APPROX if rec.approx else 0)
    return [m.ROUTE, rec.request_id, _wire_worker(rec.worker), _wire_worker(rec.decode_worker), rec.prefill_tokens,
            rec.blocks, rec.ttl_s, m.pack_hashes(rec.hashes) if rec.hashes else b"", flags]
