"""What every gateway drop-in shares: a :class:`Router` kept in step with the gateway's pool.

A gateway (Ray Serve, LiteLLM) owns the list of backends, sends the request
and knows when it ends; kvroute only chooses.  :class:`GatewayRouting` is the
small state machine between the two:

* :meth:`GatewayRouting.sync` -- the gateway's current candidates: unknown ones
  are added to the router, known ones missing from the list stop taking new
  requests (their in-flight requests still finish), returning ones take
  requests again.  :meth:`GatewayRouting.forget` removes a backend for good.
* :meth:`GatewayRouting.route` -- one decision per gateway request id (a
  gateway that asks twice for the same request, as Ray Serve does while it
  backs off, gets the same answer without a second load charge), returning the
  candidates ranked by the policy's cost.
* :meth:`GatewayRouting.release` -- the request ended (success, error, retry
  elsewhere, cancel): the router's load is released exactly once; unknown ids
  are ignored and counted (a gateway callback for a request kvroute never
  routed).  On success with ``approximate=True`` the prompt's blocks are
  recorded in the index as held by the backend that served it.

Approximate index.  Without the engines' KV events (``KVEventSubscriber`` on
``router.index``, the exact path), the only knowledge is where prompts were
served.  ``approximate=True`` stores each served prompt's blocks, bounded per
backend by ``approx_capacity_blocks`` (least recently served blocks are
forgotten first): a guess that a real cache of that size keeps what it served
most recently.  Keep it off when KV events feed the index: both writing the
same index would double-count.

Thread safety: every method holds ``router.lock`` (an RLock), so a gateway's
event-loop thread and its callback threads may call in any order.
"""
from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Sequence

from ..kvindex.hashing import block_hash_list
from ..router import NoHealthyWorkerError, Router, WorkerStatus
from ..router.types import Decision

log = logging.getLogger(__name__)

# Gateway objects alive in this process, by kind (see ``track``).  Kept here, in a module
# that is always pickled by reference: Ray Serve pickles a request router's own module
# by value, so state kept there would be copied, and a lock would not pickle at all.
_LIVE: dict[str, "weakref.WeakSet[Any]"] = {}
_LIVE_LOCK = threading.Lock()


def track(kind: str, obj: Any) -> None:
    """Remember a live gateway object (weakly) so that :func:`tracked` can find it."""
    with _LIVE_LOCK:
        _LIVE.setdefault(kind, weakref.WeakSet()).add(obj)


def tracked(kind: str) -> list[Any]:
    """The live gateway objects of one kind in this process (for metrics, tests, event feeds)."""
    with _LIVE_LOCK:
        return list(_LIVE.get(kind, ()))


@dataclass(slots=True)
class _Flight:
    """One routed gateway request until its release."""

    #: Backend kvroute chose (where its load is counted).
    worker: Hashable
    #: Content hashes of the prompt's full blocks (for the approximate index).
    hashes: list[int]
    #: The decision, returned again when the gateway asks twice.
    decision: Decision
    #: Backends ranked by cost, best first, as returned by ``route``.
    ranking: list[Hashable] = field(default_factory=list)


@dataclass(slots=True)
class GatewayStats:
    """Counters of a :class:`GatewayRouting` (read-only for callers)."""

    #: Decisions made (one per gateway request id).
    routed: int = 0
    #: Requests released after success / failure.
    succeeded: int = 0
    failed: int = 0
    #: Requests the gateway sent to a backend other than kvroute's first choice.
    diverted: int = 0
    #: Releases for ids kvroute never routed (or already released).
    unknown_releases: int = 0
    #: Requests routed without kvroute (no token ids: the gateway's own choice).
    unroutable: int = 0
    #: Blocks recorded / forgotten by the approximate index.
    approx_stored_blocks: int = 0
    approx_evicted_blocks: int = 0

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class GatewayRouting:
    """A :class:`Router` driven by a gateway's pool and request lifecycle (module docstring)."""

    def __init__(self, router: Router, *, approximate: bool = False,
                 approx_capacity_blocks: int | None = 100_000) -> None:
        if approx_capacity_blocks is not None and approx_capacity_blocks <= 0:
            raise ValueError(f"approx_capacity_blocks must be positive or None, got {approx_capacity_blocks}")
        #: The router (its index may also be fed by a KVEventSubscriber).
        self.router = router
        #: Whether served prompts are recorded in the index (see module docstring).
        self.approximate = approximate
        #: Per-backend bound of the approximate index, in blocks (None: unbounded).
        self.approx_capacity_blocks = approx_capacity_blocks
        #: Counters.
        self.stats = GatewayStats()
        self._flights: dict[Hashable, _Flight] = {}
        self._approx: dict[Hashable, OrderedDict[int, None]] = {}

    @property
    def lock(self) -> Any:
        return self.router.lock

    # ------------------------------------------------------------------ pool
    def sync(self, candidates: Iterable[Hashable]) -> None:
        """Make the router's accepting workers equal ``candidates`` (see module docstring)."""
        want = set(candidates)
        r = self.router
        with r.lock:
            known = set(r.workers())
            for w in want - known:
                r.add_worker(w)
            for w in known:
                st = r.worker_state(w).status
                if w in want and st is not WorkerStatus.HEALTHY:
                    r.set_status(w, WorkerStatus.HEALTHY)
                elif w not in want and st is WorkerStatus.HEALTHY:
                    r.set_status(w, WorkerStatus.DRAINING)

    def forget(self, worker: Hashable) -> None:
        """The backend is gone for good: drop its load, its index entries, its approximate blocks."""
        with self.router.lock:
            if worker in self.router.workers():
                self.router.remove_worker(worker)
            self._approx.pop(worker, None)

    # --------------------------------------------------------------- routing
    def route(self, request_id: Hashable, token_ids: Sequence[int], candidates: Iterable[Hashable],
              *, lora_name: str | None = None, cache_salt: str | None = None) -> list[Hashable]:
        """Route ``token_ids`` among ``candidates``; the candidates ranked best first.

        Called again with a live ``request_id`` it returns the first ranking
        (restricted to the current candidates) without routing again.  Raises
        :class:`~kvroute.router.NoHealthyWorkerError` when no candidate is left.
        """
        cands = list(candidates)
        r = self.router
        with r.lock:
            f = self._flights.get(request_id)
            if f is None:
                self.sync(cands)
                hashes = block_hash_list(token_ids, r.block_size, lora_name=lora_name, cache_salt=cache_salt)
                d = r.route_hashes(hashes, num_tokens=len(token_ids), request_id=request_id)
                ranking = sorted(d.costs, key=lambda w: (w != d.worker, d.costs[w]))
                f = _Flight(d.worker, list(hashes), d, ranking)
                self._flights[request_id] = f
                self.stats.routed += 1
            present = set(cands)
            ranked = [w for w in f.ranking if w in present]
            if not ranked:
                raise NoHealthyWorkerError(f"none of kvroute's choices for {request_id!r} is a candidate any more")
            return ranked

    def decision(self, request_id: Hashable) -> Decision | None:
        """The decision of a live request, or None."""
        with self.router.lock:
            f = self._flights.get(request_id)
            return f.decision if f is not None else None

    def served_by(self, request_id: Hashable, worker: Hashable) -> None:
        """The gateway reports where the request actually went (counted when not kvroute's choice).

        The load stays counted on kvroute's choice until release: the router
        has no way to move it, and a gateway diverts only when that backend
        refused (full), a state that ends with the request.
        """
        with self.router.lock:
            f = self._flights.get(request_id)
            if f is not None and worker != f.worker:
                self.stats.diverted += 1
                log.debug("request %r went to %r, not kvroute's %r", request_id, worker, f.worker)

    def release(self, request_id: Hashable, *, success: bool, served_by: Hashable | None = None) -> bool:
        """The request ended; release its load (idempotent).  Returns whether it was live."""
        r = self.router
        with r.lock:
            f = self._flights.pop(request_id, None)
            if f is None:
                self.stats.unknown_releases += 1
                return False
            try:
                r.finish(request_id)
            except KeyError:  # released already by the router's request_ttl_s
                pass
            if success:
                self.stats.succeeded += 1
                if self.approximate and f.hashes:
                    self._store(served_by if served_by is not None else f.worker, f.hashes)
            else:
                self.stats.failed += 1
            return True

    def in_flight(self) -> int:
        """Requests routed and not yet released."""
        with self.router.lock:
            return len(self._flights)

    # ------------------------------------------------------- approximate index
    def _store(self, worker: Hashable, hashes: list[int]) -> None:
        r = self.router
        if worker not in r.workers():
            return
        r.index.store(worker, hashes)
        lru = self._approx.setdefault(worker, OrderedDict())
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                self.stats.approx_stored_blocks += 1
        cap = self.approx_capacity_blocks
        if cap is not None and len(lru) > cap:
            old = [lru.popitem(last=False)[0] for _ in range(len(lru) - cap)]
            r.index.remove(worker, old)
            self.stats.approx_evicted_blocks += len(old)
