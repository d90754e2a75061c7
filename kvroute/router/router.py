"""The :class:`Router`: exact index + speculative prefixes + load + a policy = a decision.

Parts (who owns what):

* ``index``    -- the exact :class:`KVIndex`, fed by engine events (the sidecar's
  subscriber or the simulator's caches); the router only reads it, except
  ``remove_worker`` which forgets a worker's blocks.
* ``_pending`` -- :class:`PendingPrefixes`, the router's own speculative view.
* ``_states``  -- {worker: :class:`WorkerState`}, mutated only by router methods.
* ``_requests`` -- {request id: _Flight}, the load each live request adds.
* ``policy``   -- a :class:`Policy` from :data:`POLICIES`; sees a fresh
  :class:`Candidate` per accepting worker for each request.

Cost per request: one hash pass (``route``), one index walk and one pending
walk over the prompt's blocks (bit masks, not per worker), then O(workers)
for the policy -- never O(workers x blocks).
Thread safety: every public method holds ``lock`` (pass the event
subscriber's lock so routing never sees half an event batch).  With the
compiled route (:mod:`kvroute.router.native`) ``route`` hashes the prompt
before taking the lock, with the GIL released for long prompts.
"""
from __future__ import annotations

import heapq
import random
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..kvindex import KVIndex
from ..kvindex.hashing import ROOT_SEED, block_hash_list, native_prompt
from . import native as _native
from .disagg import DecodeWeights, choose_decode
from .errors import DuplicateRequestError, NoHealthyWorkerError, UnknownPolicyError, UnknownRequestError, UnknownWorkerError
from .pending import PendingPrefixes
from .policies import POLICIES
from .policy import Policy
from .types import Candidate, Decision, FleetView, Role, RouteRequest, WorkerState, WorkerStatus

#: llm-d's speculative-entry lifetime (BRIEF section 4).
DEFAULT_PENDING_TTL_S = 2.0


class _Flight:
    """Load one live request adds, so it can be released exactly once."""

    __slots__ = ("prefill", "decode", "prefill_tokens", "blocks", "prefill_open", "at")

    def __init__(self, prefill: WorkerState, decode: WorkerState, prefill_tokens: int, blocks: int, at: float) -> None:
        #: Worker that computes the prompt.
        self.prefill = prefill
        #: Worker that holds the KV while decoding (``prefill`` when pools are aggregated).
        self.decode = decode
        #: Uncached prompt tokens added to ``prefill.prefill_tokens``.
        self.prefill_tokens = prefill_tokens
        #: Prompt blocks added to ``decode.decode_blocks``.
        self.blocks = blocks
        #: Whether the prefill load is still counted (``prefill_done`` not yet called).
        self.prefill_open = True
        #: Router clock time of the decision (for ``request_ttl_s``).
        self.at = at


class Router:
    """Pick a worker for each prompt; see the module docstring for the parts.

    ``workers``: ids of aggregated workers (or of the prefill pool when
    ``decode_workers`` is given).  ``policy``: a name in :data:`POLICIES` or a
    :class:`Policy`; ``weights``: that policy's weights (dataclass or dict).
    ``clock``: seconds, injected for simulation and tests.  ``index``: an
    existing :class:`KVIndex` (e.g. restored from a snapshot).  ``request_ttl_s``:
    a request neither finished nor cancelled this long after its decision is
    released as if finished (a client that lost its ``finish`` must not leave
    load, and memory, behind forever); None (default) keeps requests until
    ``finish``.
    """

    def __init__(
        self,
        workers: Iterable[Any] = (),
        block_size: int = 16,
        *,
        policy: str | Policy = "kvroute",
        weights: Any = None,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        index: KVIndex | None = None,
        pending_ttl_s: float = DEFAULT_PENDING_TTL_S,
        decode_workers: Iterable[Any] = (),
        decode_weights: DecodeWeights | None = None,
        capacity_blocks: int | None = None,
        lock: Any = None,
        request_ttl_s: float | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if request_ttl_s is not None and not request_ttl_s > 0:
            raise ValueError(f"request_ttl_s must be positive or None, got {request_ttl_s}")
        #: Seconds after which an unfinished request is released (None: never).
        self.request_ttl_s = request_ttl_s
        #: Requests released by ``request_ttl_s`` (their ``finish`` never came).
        self.expired_requests = 0
        #: Tokens per KV block (must match the engines').
        self.block_size = block_size
        #: The exact index (engine events); shared with the event subscriber.
        self.index = index if index is not None else KVIndex(block_size)
        if isinstance(policy, Policy):
            if weights is not None:
                raise ValueError("pass weights to the policy object, not to the Router")
            self.policy = policy
        else:
            cls = POLICIES.get(policy)
            if cls is None:
                raise UnknownPolicyError(f"unknown policy {policy!r}; known: {sorted(POLICIES)}")
            #: The routing policy (read-only after construction).
            self.policy = cls(weights)
        self.decode_weights = decode_weights or DecodeWeights()
        #: Guards every public method; share it with whatever mutates ``index`` concurrently.
        self.lock = lock if lock is not None else threading.RLock()
        self._clock = clock
        self._rng = random.Random(seed)
        #: The compiled route (kvroute.router.native), or None: then every decision takes the Python path.
        self._core = _native.make_core(self.index, self.policy, pending_ttl_s, clock, block_size)
        self._pending = (_native.NativePending(self._core, clock) if self._core is not None
                         else PendingPrefixes(pending_ttl_s, clock))
        self._pool_ids: list[Any] = []
        self._index_gen = -1
        self._states: dict[Any, WorkerState] = {}
        self._slot: dict[Any, int] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._order = 0
        self._requests: dict[Any, _Flight] = {}
        self._prefill_pool: list[WorkerState] | None = None
        self._decode_pool: list[WorkerState] | None = None
        self._disaggregated = False
        #: Decisions made, and sums of predicted cached / prompt tokens (for hit-ratio metrics).
        self.decisions = 0
        self.predicted_cached_tokens_total = 0
        self.prompt_tokens_total = 0
        decode_workers = list(decode_workers)
        for w in workers:
            self.add_worker(w, role=Role.PREFILL if decode_workers else Role.BOTH, capacity_blocks=capacity_blocks)
        for w in decode_workers:
            self.add_worker(w, role=Role.DECODE, capacity_blocks=capacity_blocks)

    # ------------------------------------------------------------------ workers
    def add_worker(self, worker: Any, *, role: Role | str = Role.BOTH, capacity_blocks: int | None = None) -> None:
        """Register a worker (idempotent for a known worker: it becomes healthy again)."""
        role = Role.parse(role)
        with self.lock:
            s = self._states.get(worker)
            if s is not None:
                s.role = role
                s.status = WorkerStatus.HEALTHY
                if capacity_blocks is not None:
                    s.capacity_blocks = capacity_blocks
            else:
                s = WorkerState(worker, self._order, role, capacity_blocks)
                self._order += 1
                self._states[worker] = s
                if self._free_slots:
                    self._slot[worker] = heapq.heappop(self._free_slots)
                else:
                    self._slot[worker] = self._next_slot
                    self._next_slot += 1
            self._disaggregated = any(x.role is not Role.BOTH for x in self._states.values())
            self.index.add_worker(worker)
            self._sync(s)
            self._pools_changed()

    def remove_worker(self, worker: Any) -> None:
        """Forget a worker: its load, its pending prefixes and its blocks in the index.

        Requests in flight on it can still be finished (their release is a no-op).
        """
        with self.lock:
            s = self._state(worker)
            del self._states[worker]
            slot = self._slot.pop(worker)
            self._pending.forget(slot)
            heapq.heappush(self._free_slots, slot)
            if worker in self.index:
                self.index.remove_worker(worker)
            self.policy.forget_worker(worker)
            s.status = WorkerStatus.UNHEALTHY
            self._disaggregated = any(x.role is not Role.BOTH for x in self._states.values())
            self._pools_changed()

    def drain_worker(self, worker: Any) -> None:
        """Stop sending new requests to a worker; its in-flight requests finish normally."""
        self.set_status(worker, WorkerStatus.DRAINING)

    def mark_unhealthy(self, worker: Any, unhealthy: bool = True) -> None:
        """Take a worker out of (or, with ``unhealthy=False``, back into) rotation."""
        self.set_status(worker, WorkerStatus.UNHEALTHY if unhealthy else WorkerStatus.HEALTHY)

    def mark_healthy(self, worker: Any) -> None:
        self.set_status(worker, WorkerStatus.HEALTHY)

    def set_status(self, worker: Any, status: WorkerStatus | str) -> None:
        status = status if isinstance(status, WorkerStatus) else WorkerStatus(str(status).lower())
        with self.lock:
            self._state(worker).status = status
            self._pools_changed()

    def update_load(
        self,
        worker: Any,
        *,
        waiting: int | None = None,
        running: int | None = None,
        kv_usage: float | None = None,
        queue_tokens: int | None = None,
        capacity_blocks: int | None = None,
    ) -> None:
        """Record a worker's own load report (every field optional; None keeps the last value)."""
        for name, v in (("waiting", waiting), ("running", running), ("queue_tokens", queue_tokens),
                        ("capacity_blocks", capacity_blocks)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if kv_usage is not None and not (isinstance(kv_usage, (int, float)) and 0.0 <= kv_usage <= 1.0):
            raise ValueError(f"kv_usage must lie in [0, 1], got {kv_usage!r}")
        with self.lock:
            s = self._state(worker)
            if waiting is not None:
                s.reported_waiting = waiting
            if running is not None:
                s.reported_running = running
            if kv_usage is not None:
                s.reported_kv_usage = float(kv_usage)
            if queue_tokens is not None:
                s.reported_queue_tokens = queue_tokens
            if capacity_blocks is not None:
                s.capacity_blocks = capacity_blocks or None
            s.reported_at = self._clock()
            self._sync(s)

    def workers(self) -> list[Any]:
        with self.lock:
            return list(self._states)

    def worker_state(self, worker: Any) -> WorkerState:
        """The live state object of a worker (read it; mutate it only through router methods)."""
        return self._state(worker)

    def healthy_workers(self) -> list[Any]:
        with self.lock:
            return [w for w, s in self._states.items() if s.accepting]

    def _state(self, worker: Any) -> WorkerState:
        s = self._states.get(worker)
        if s is None:
            raise UnknownWorkerError(f"unknown worker {worker!r}")
        return s

    def _sync(self, s: WorkerState) -> None:
        """Mirror a worker's load numbers into the compiled route (after every change to them)."""
        if self._core is not None:
            self._core.set_row(
                self._slot[s.id], s.prefill_tokens, s.prefill_requests, s.decode_blocks, s.active_requests,
                s.routed_total, -1 if s.reported_waiting is None else s.reported_waiting,
                -1 if s.reported_queue_tokens is None else s.reported_queue_tokens,
                float("nan") if s.reported_kv_usage is None else s.reported_kv_usage, s.capacity_blocks or 0)

    def _pools_changed(self) -> None:
        self._prefill_pool = None
        self._decode_pool = None

    def _pools(self) -> tuple[list[WorkerState], list[WorkerState]]:
        if self._prefill_pool is None or self._decode_pool is None:
            ordered = sorted(self._states.values(), key=lambda s: s.order)
            self._prefill_pool = [s for s in ordered if s.accepting and s.role is not Role.DECODE]
            self._decode_pool = [s for s in ordered if s.accepting and s.role is not Role.PREFILL]
            self._index_gen = -1
        if self._core is not None and self._index_gen != self.index.slot_generation:
            islots = self.index.slots()
            self._pool_ids = [s.id for s in self._prefill_pool]
            self._core.set_pool([self._slot[w] for w in self._pool_ids], [islots.get(w, 0xFFFFFFFF) for w in self._pool_ids])
            self._index_gen = self.index.slot_generation
        return self._prefill_pool, self._decode_pool

    # ------------------------------------------------------------------ routing
    def route(
        self,
        token_ids: Any,
        *,
        request_id: Any,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        mm_hashes: Iterable[Any] | None = None,
    ) -> Decision:
        """Hash a prompt (same scheme as the index) and :meth:`route_hashes` it.

        With the compiled route (:mod:`kvroute.router.native`): one core call hashes the prompt
        (outside the lock) and one decides (under it); same decisions as the Python path.
        """
        if self._core is not None:
            return self._route_native(token_ids, request_id, lora_name, cache_salt, mm_hashes)
        hs = block_hash_list(token_ids, self.block_size, lora_name=lora_name, cache_salt=cache_salt, mm_hashes=mm_hashes)
        n = token_ids.size if isinstance(token_ids, np.ndarray) else len(token_ids)
        return self.route_hashes(hs, num_tokens=int(n), request_id=request_id)

    def route_hashes(self, hashes: Sequence[int] | np.ndarray, *, num_tokens: int, request_id: Any) -> Decision:
        """Route a prompt given its chained content hashes (one per full block) and its length."""
        hs = hashes.tolist() if isinstance(hashes, np.ndarray) else hashes
        if num_tokens < 0:
            raise ValueError("num_tokens must be >= 0")
        bs = self.block_size
        nb = min(len(hs), num_tokens // bs) if num_tokens else len(hs)
        if nb < len(hs):
            hs = hs[:nb]
        num_tokens = max(num_tokens, nb * bs)
        with self.lock:
            now, prefill_pool, decode_pool = self._admit(request_id)
            pending = self._pending
            pending.expire(now)
            overlaps = self.index.match(hs) if hs else {}
            pend = pending.match(hs) if (hs and self.policy.uses_pending) else {}
            slot_of = self._slot
            cands = []
            for s in prefill_pool:
                ov = overlaps.get(s.id)
                pd = pend.get(slot_of[s.id], 0) if pend else 0
                if ov is None:
                    cands.append(Candidate(s, pd, 0, 0, 0, pd) if pd else Candidate(s))
                elif pd > ov.total:
                    cands.append(Candidate(s, pd, ov.gpu, ov.host, ov.disk, pd - ov.total))
                else:
                    cands.append(Candidate(s, ov.total, ov.gpu, ov.host, ov.disk, 0))
            req = RouteRequest(request_id, num_tokens, nb, bs)
            fleet = FleetView(cands, self._rng, now)
            choice = self.policy.choose(req, fleet)
            chosen = next((c for c in cands if c.worker == choice.worker), None)
            if chosen is None:
                raise RuntimeError(f"policy {self.policy.name!r} chose {choice.worker!r}, not a candidate")
            ps = chosen.state
            decode_costs: dict[Any, float] = {}
            if self._disaggregated:
                ds, decode_costs = choose_decode(nb, decode_pool, self.decode_weights, self._rng)
            else:
                ds = ps
            uncached = max(0, num_tokens - chosen.total * bs)
            self._commit(request_id, ps, ds, uncached, nb, now)
            if hs and chosen.confirmed < nb:  # nothing to speculate when the index confirms the whole prompt
                pending.add(slot_of[ps.id], hs)
            self.policy.on_routed(req, fleet, chosen)
            cached = chosen.total * bs
            self.decisions += 1
            self.predicted_cached_tokens_total += cached
            self.prompt_tokens_total += num_tokens
            return Decision(
                request_id=request_id,
                worker=ps.id,
                predicted_cached_tokens=cached,
                predicted_gpu_tokens=(chosen.gpu + chosen.pending) * bs,
                predicted_host_tokens=chosen.host * bs,
                predicted_disk_tokens=chosen.disk * bs,
                predicted_pending_tokens=chosen.pending * bs,
                costs=choice.costs,
                reason=choice.reason,
                policy=self.policy.name,
                num_tokens=num_tokens,
                prefill_worker=ps.id if self._disaggregated else None,
                decode_worker=ds.id if self._disaggregated else None,
                decode_costs=decode_costs,
            )

    def _route_native(self, token_ids: Any, request_id: Any, lora_name: Any, cache_salt: Any, mm_hashes: Any) -> Decision:
        core = _native.core
        bs = self.block_size
        toks, enc = native_prompt(token_ids, bs, lora_name, cache_salt, mm_hashes)
        try:
            h = core.hash_prompt(toks, bs, enc, ROOT_SEED)
        except TypeError:  # a container the core does not read (e.g. a big-endian array)
            h = core.hash_prompt(np.asarray(toks).astype("<u4"), bs, enc, ROOT_SEED)
        with self.lock:
            now, prefill_pool, decode_pool = self._admit(request_id)
            tied, reason, costs, best, num_tokens = self._core.route(h, now, now)
            nb = len(h)
            if len(tied) == 1:
                j, total, gpu, host, disk, pend = tied[0]
            else:  # the cost model left a tie: the router's seeded rng breaks it, as on the Python path
                j, total, gpu, host, disk, pend = tied[self._rng.randrange(len(tied))]
                if reason != 3:
                    reason = 0 if best == 0 else (1 if total == best else 2)
                if nb and gpu + host + disk < nb:
                    self._core.pending_add_last(self._slot[prefill_pool[j].id], now)
            ps = prefill_pool[j]
            decode_costs: dict[Any, float] = {}
            if self._disaggregated:
                ds, decode_costs = choose_decode(nb, decode_pool, self.decode_weights, self._rng)
            else:
                ds = ps
            uncached = max(0, num_tokens - total * bs)
            self._commit(request_id, ps, ds, uncached, nb, now)
            cached = total * bs
            self.decisions += 1
            self.predicted_cached_tokens_total += cached
            self.prompt_tokens_total += num_tokens
            return Decision(
                request_id=request_id,
                worker=ps.id,
                predicted_cached_tokens=cached,
                predicted_gpu_tokens=(gpu + pend) * bs,
                predicted_host_tokens=host * bs,
                predicted_disk_tokens=disk * bs,
                predicted_pending_tokens=pend * bs,
                costs=dict(zip(self._pool_ids, costs)),
                reason=_native.REASONS[reason],
                policy=self.policy.name,
                num_tokens=num_tokens,
                prefill_worker=ps.id if self._disaggregated else None,
                decode_worker=ds.id if self._disaggregated else None,
                decode_costs=decode_costs,
            )

    def _admit(self, request_id: Any) -> tuple[float, list[WorkerState], list[WorkerState]]:
        """Under the lock, before a decision: expire stale requests, refuse duplicates and empty pools."""
        now = self._clock()
        if self.request_ttl_s is not None and self._requests:
            self._expire_requests(now - self.request_ttl_s)
        if request_id in self._requests:
            raise DuplicateRequestError(f"request {request_id!r} is already in flight")
        prefill_pool, decode_pool = self._pools()
        if not prefill_pool:
            raise NoHealthyWorkerError("no healthy worker can take a prefill")
        if self._disaggregated and not decode_pool:
            raise NoHealthyWorkerError("no healthy decode worker")
        return now, prefill_pool, decode_pool

    def _commit(self, rid: Any, ps: WorkerState, ds: WorkerState, uncached: int, nb: int, now: float) -> None:
        ps.prefill_tokens += uncached
        ps.prefill_requests += 1
        ps.routed_total += 1
        ps.active_requests += 1
        if ds is not ps:
            ds.active_requests += 1
            ds.routed_total += 1
        ds.decode_blocks += nb
        self._requests[rid] = _Flight(ps, ds, uncached, nb, now)
        if self._core is not None:
            self._sync(ps)
            if ds is not ps:
                self._sync(ds)

    def _expire_requests(self, cutoff: float) -> None:
        """Release requests decided at or before ``cutoff`` (oldest first: dicts keep insertion order)."""
        reqs = self._requests
        while reqs:
            rid, f = next(iter(reqs.items()))
            if f.at > cutoff:
                return
            del reqs[rid]
            self._release(f)
            self.expired_requests += 1

    def prefill_done(self, request_id: Any) -> None:
        """The request's prefill finished: its prompt no longer queues compute (idempotent)."""
        with self.lock:
            f = self._requests.get(request_id)
            if f is None:
                raise UnknownRequestError(f"unknown request {request_id!r}")
            self._release_prefill(f)

    def _release_prefill(self, f: _Flight) -> None:
        if not f.prefill_open:
            return
        f.prefill_open = False
        p = f.prefill
        p.prefill_tokens -= f.prefill_tokens
        p.prefill_requests -= 1
        if f.decode is not p:
            p.active_requests -= 1
        if self._core is not None and p.id in self._slot and self._states.get(p.id) is p:
            self._sync(p)

    def finish(self, request_id: Any) -> None:
        """The request finished (or was cancelled): release all the load it added."""
        with self.lock:
            f = self._requests.pop(request_id, None)
            if f is None:
                raise UnknownRequestError(f"unknown request {request_id!r}")
            self._release(f)

    def _release(self, f: _Flight) -> None:
        self._release_prefill(f)
        d = f.decode
        d.decode_blocks -= f.blocks
        d.active_requests -= 1
        if self._core is not None and d.id in self._slot and self._states.get(d.id) is d:
            self._sync(d)

    def in_flight(self) -> int:
        return len(self._requests)

    # -------------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        """Decisions, predicted hit ratio, pending entries, in-flight requests, per-worker state."""
        with self.lock:
            return {
                "policy": self.policy.name,
                "decisions": self.decisions,
                "predicted_hit_ratio": (self.predicted_cached_tokens_total / self.prompt_tokens_total)
                if self.prompt_tokens_total else 0.0,
                "pending_entries": len(self._pending),
                "in_flight": len(self._requests),
                "expired_requests": self.expired_requests,
                "disaggregated": self._disaggregated,
                "workers": [s.to_dict() for s in sorted(self._states.values(), key=lambda s: s.order)],
            }
