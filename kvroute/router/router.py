"""The :class:`Router`: exact index + speculative prefixes + load + a policy = a decision.

Parts (who owns what):

* ``index``    -- the exact :class:`KVIndex`, fed by engine events (the sidecar's
  subscriber or the simulator's caches); the router only reads it, except
  ``remove_worker`` which forgets a worker's blocks.
* ``_pending`` -- :class:`PendingPrefixes`, the router's own speculative view.
* ``_active``  -- :class:`ActiveBlocks`, distinct prompt blocks of unfinished
  requests per worker; kept only for a policy with ``tracks_active_blocks``.
* ``_states``  -- {worker: :class:`WorkerState`}, mutated only by router methods.
* ``_requests`` -- {request id: _Flight}, the load each live request adds.
* ``policy``   -- a :class:`Policy` from :data:`POLICIES`; sees a fresh
  :class:`Candidate` per accepting worker for each request.
* ``_approx``  -- :class:`ApproxPrefixes`, the predicted cache of workers in
  approximate mode (no KV events, or a stale stream): fed by this router's
  decisions and by :meth:`Router.add_approx` (other replicas' decisions).
* ``_remote``  -- {key: _Flight}, load other router replicas put on the workers
  (:meth:`Router.track_remote` / :meth:`Router.release_remote`), each with a
  deadline after which it is released.
* ``_observers`` -- objects told of every decision and release (replica sync);
  they run under ``lock`` and must only enqueue.

Cost per request: one hash pass (``route``), one index walk and one pending
walk over the prompt's blocks (bit masks, not per worker), then O(workers)
for the policy -- never O(workers x blocks).
Thread safety: every public method holds ``lock`` (pass the event
subscriber's lock so routing never sees half an event batch).  With the
compiled route (:mod:`kvroute.router.native`) ``route`` hashes the prompt
before taking the lock, with the GIL released for long prompts.  A chain longer
than :data:`CHAIN_CHUNK_BLOCKS` enters the pending / approximate tables one chunk
per turn of the lock after the decision (:meth:`Router._add_chain_rest`): no
request holds the lock for more than one chunk at a time.
"""
from __future__ import annotations

import heapq
import random
from array import array
import threading
import time
from typing import Any, Callable, Collection, Iterable, Sequence

import numpy as np

from ..kvindex import KVIndex
from ..kvindex.hashing import ROOT_SEED, block_hash_list, block_hashes, native_prompt
from . import native as _native
from .disagg import DecodeWeights, choose_decode
from .errors import (DuplicateRequestError, NoHealthyWorkerError, PromptLengthError, UnknownPolicyError, UnknownRequestError,
                     UnknownWorkerError)
from .active import ActiveBlocks
from .approx import DEFAULT_APPROX_TTL_S, ApproxPrefixes
from .pending import PendingPrefixes
from .policies import POLICIES, policy_class
from .policy import Policy
from .types import Candidate, Decision, FleetView, FlightRecord, Role, RouteHints, RouteRequest, WorkerState, WorkerStatus

#: llm-d's speculative-entry lifetime (BRIEF section 4).
DEFAULT_PENDING_TTL_S = 2.0
#: Longest prompt a Router takes by default (tokens; ``max_prompt_tokens``): beyond any served context
#: window, and a bound on the prefill load one ``num_tokens`` can book on a worker (issue 17: 2**63 sent
#: every cached prompt elsewhere).  The sidecar's protocol allows 2**21.
DEFAULT_MAX_PROMPT_TOKENS = 1 << 24
#: Blocks of a routed chain added to the pending and approximate tables per turn of the lock.  A
#: decision adds its chain's first chunk; the rest follows one chunk per turn, the lock released and
#: the GIL given up between turns (:meth:`Router._add_chain_rest`), so a maximal prompt (2**21 tokens:
#: 131,072 blocks of 16, ~16 ms of table inserts) holds other requests up for one chunk at a time,
#: not for the whole chain (issue 17).  Chosen with bench/chain_chunks.py (another thread's waits for
#: the GIL beside back-to-back maximal routes, quiet machine): 4,096 -> p99 2.8 / max 5.1 ms, 1,024 ->
#: p99 0.8 / max 3.2 ms, for +30% on the maximal route itself (33 -> 44 ms); judged end to end by
#: bench/sidecar_stall.py.
CHAIN_CHUNK_BLOCKS = 1024
#: The same for the approximate table (approximate-mode workers), whose inserts are Python dict and LRU
#: operations (~1-2 us a block with the capacity bound evicting): a smaller chunk keeps one turn under
#: about half a millisecond (bench/sidecar_stall.py --approx).
APPROX_CHUNK_BLOCKS = 256


class _Flight:
    """Load one live request adds, so it can be released exactly once."""

    __slots__ = ("prefill", "decode", "prefill_tokens", "blocks", "prefill_open", "at", "deadline", "hashes")

    def __init__(self, prefill: WorkerState, decode: WorkerState, prefill_tokens: int, blocks: int, at: float,
                 hashes: Sequence[int] | None = None) -> None:
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
        #: Router clock time at which a remote flight is released (None: local flights).
        self.deadline: float | None = None
        #: The prompt's block hashes when active blocks are tracked (released from ``ActiveBlocks``), else None.
        self.hashes = hashes


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
    ``finish``.  ``max_prompt_tokens``: longest prompt taken (:class:`PromptLengthError`
    beyond it, and for a ``num_tokens`` outside ``[0, max_prompt_tokens]``).
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
        approx_ttl_s: float = DEFAULT_APPROX_TTL_S,
        approx_capacity_blocks: int | None = None,
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if request_ttl_s is not None and not request_ttl_s > 0:
            raise ValueError(f"request_ttl_s must be positive or None, got {request_ttl_s}")
        if isinstance(max_prompt_tokens, bool) or not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be a positive int, got {max_prompt_tokens!r}")
        #: Longest prompt (tokens) ``route`` / ``route_hashes`` take; longer ones raise PromptLengthError.
        self.max_prompt_tokens = max_prompt_tokens
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
            cls = policy_class(policy)
            if cls is None:
                raise UnknownPolicyError(f"unknown policy {policy!r}; known: {sorted(POLICIES)}")
            #: The routing policy (read-only after construction).
            self.policy = cls(weights)
        self.decode_weights = decode_weights or DecodeWeights()
        #: Guards every public method; share it with whatever mutates ``index`` concurrently.
        self.lock = lock if lock is not None else threading.RLock()
        self._clock = clock
        self._rng = random.Random(seed)
        self._approx = ApproxPrefixes(approx_ttl_s)
        #: Predicted blocks kept per approximate-mode worker (None: its ``capacity_blocks``, else the
        #: table's default); an engine offloading to host memory holds GPU + host blocks.
        self.approx_capacity_blocks = approx_capacity_blocks
        self._approx_slots = 0  # bitmask of the slots of workers in approximate mode
        self._remote: dict[Any, _Flight] = {}
        self._remote_heap: list[tuple[float, int, Any, _Flight]] = []
        self._remote_seq = 0
        self._observers: list[Any] = []
        #: Remote flights released by their deadline (their origin never released them).
        self.expired_remote = 0
        self._active: ActiveBlocks | None = ActiveBlocks() if self.policy.tracks_active_blocks else None
        #: Decisions of other replicas this router had not seen when deciding, on average (0: one router, or
        #: replicas that see each other at once).  Written by replica sync (``kvroute.sync.ReplicaSync``);
        #: handed to the policy as ``FleetView.unseen``.
        self.view_unseen = 0.0
        #: The compiled route (kvroute.router.native), or None: then every decision takes the Python path.
        self._core = _native.make_core(self.index, self.policy, pending_ttl_s, clock, block_size)
        self._pending = (_native.NativePending(self._core, clock) if self._core is not None
                         else PendingPrefixes(pending_ttl_s, clock))
        if self._active is not None and self._core is not None:  # the compiled table beside the compiled route
            self._active = _native.NativeActive()
        self._pool_ids: list[Any] = []
        self._index_gen = -1
        self._states: dict[Any, WorkerState] = {}
        self._slot: dict[Any, int] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._order = 0
        self._requests: dict[Any, _Flight] = {}
        #: Workers whose index entries are not credited (health: the router is blind to their
        #: cache); set through :meth:`set_cache_credited` only.
        self._uncredited: set[Any] = set()
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
            self._approx.forget(slot)
            self._approx_slots &= ~(1 << slot)
            if self._active is not None:
                self._active.forget(slot)
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

    def set_cache_credited(self, worker: Any, credited: bool) -> None:
        """Whether the router counts ``worker``'s cached blocks (index overlap) when routing.

        The sidecar's health monitor turns credit off for a worker whose events it cannot
        trust (endpoint never connected, silent stream, block-size mismatch) and back on when
        the reason clears; the worker stays routable, by load alone.  Pending (speculative)
        prefixes the router itself recorded still count."""
        with self.lock:
            if credited:
                self._uncredited.discard(worker)
            else:
                self._uncredited.add(worker)

    def cache_credited(self, worker: Any) -> bool:
        with self.lock:
            return worker not in self._uncredited

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
        hints: RouteHints | None = None,
        exclude: Collection[Any] = (),
    ) -> Decision:
        """Hash a prompt (same scheme as the index) and :meth:`route_hashes` it.

        With the compiled route (:mod:`kvroute.router.native`): one core call hashes the prompt
        (outside the lock) and one decides (under it); same decisions as the Python path.
        A prompt longer than ``max_prompt_tokens`` raises :class:`PromptLengthError`.
        """
        n = token_ids.size if isinstance(token_ids, np.ndarray) else len(token_ids)
        if n > self.max_prompt_tokens:
            raise PromptLengthError(f"prompt of {n} tokens; this router takes at most {self.max_prompt_tokens}")
        if (self._core is not None and not exclude and not self._uncredited and not self._approx_slots
                and not self._observers and not self._remote):
            # The compiled route covers the plain case; worker exclusions, uncredited caches, approximate
            # mode and replica sync take the Python path (same decisions, checked by the differential tests).
            return self._route_native(token_ids, request_id, lora_name, cache_salt, mm_hashes, hints)
        if self._core is not None and n > CHAIN_CHUNK_BLOCKS * self.block_size:  # a long prompt: no int list
            hs = block_hashes(token_ids, self.block_size, lora_name=lora_name, cache_salt=cache_salt, mm_hashes=mm_hashes)
        else:
            hs = block_hash_list(token_ids, self.block_size, lora_name=lora_name, cache_salt=cache_salt, mm_hashes=mm_hashes)
        return self.route_hashes(hs, num_tokens=int(n), request_id=request_id, hints=hints, exclude=exclude)

    def route_hashes(
        self,
        hashes: Sequence[int] | np.ndarray,
        *,
        num_tokens: int,
        request_id: Any,
        hints: RouteHints | None = None,
        exclude: Collection[Any] = (),
    ) -> Decision:
        """Route a prompt given its chained content hashes (one per full block) and its length.

        ``hints``: client hints, handed to the policy in :class:`RouteRequest` and
        returned in the :class:`Decision`.  ``exclude``: workers not to choose for
        this request (a caller retrying after a worker failed it); they stay
        healthy for other requests.  ``num_tokens`` must be an int in ``[0, max_prompt_tokens]``
        and the hashes cover at most ``max_prompt_tokens``: else :class:`PromptLengthError`.
        """
        if not isinstance(hashes, np.ndarray):
            hs = hashes
        elif self._core is not None and len(hashes) > CHAIN_CHUNK_BLOCKS and hashes.dtype == np.uint64:
            # a long chain stays out of Python int lists: a list of 131k young ints made every garbage
            # collection pass that saw it cost ~9 ms, run by whichever thread allocated next, often under
            # the router's lock (issue 17, item 9); array items are ints when read, as list items are
            hs = array("Q", hashes.tobytes())
        else:
            hs = hashes.tolist()
        limit = self.max_prompt_tokens
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or not 0 <= num_tokens <= limit:
            raise PromptLengthError(f"num_tokens must be an int in [0, {limit}], got {num_tokens!r}")
        num_tokens = int(num_tokens)
        bs = self.block_size
        if len(hs) * bs > limit:
            raise PromptLengthError(f"{len(hs)} block hashes cover more than {limit} tokens")
        nb = min(len(hs), num_tokens // bs) if num_tokens else len(hs)
        if nb < len(hs):
            hs = hs[:nb]
        num_tokens = max(num_tokens, nb * bs)
        # a long chain reaches the compiled index and pending table as one uint64 array, converted here,
        # outside the lock (each took its own copy of the int list under it: ~3 ms apiece at 131k blocks)
        flat: Any = hs
        if self._core is not None and nb > CHAIN_CHUNK_BLOCKS:
            flat = np.frombuffer(hs, dtype=np.uint64) if isinstance(hs, array) else np.array(hs, dtype=np.uint64)
        with self.lock:
            now, prefill_pool, decode_pool = self._admit(request_id, exclude)
            pending = self._pending
            pending.expire(now)
            overlaps = self.index.match(flat) if hs else {}
            if self._uncredited and overlaps:
                overlaps = {w: o for w, o in overlaps.items() if w not in self._uncredited}
            pend = pending.match(flat) if (hs and self.policy.uses_pending) else {}
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
            if self._approx_slots and hs:
                approx = self._approx.match(hs, now)
                if approx:
                    _add_approx(cands, approx, slot_of)
            req = RouteRequest(request_id, num_tokens, nb, bs, hints)
            active = self._active
            if active is not None and hs and self.policy.wants_active_overlap(nb, prefill_pool):
                act = active.match(hs)
                if act:
                    for c in cands:
                        c.active = act.get(slot_of[c.worker], 0)
            fleet = FleetView(cands, self._rng, now, self.view_unseen)
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
            uncached = self.policy.booked_prefill_tokens(req, chosen)
            self._commit(request_id, ps, ds, uncached, nb, now, hs if active is not None else None)
            slot = slot_of[ps.id]
            chunk = CHAIN_CHUNK_BLOCKS
            chain: Any = hs
            speculated = bool(hs) and chosen.confirmed < nb
            pend_at = approx_at = nb
            if speculated:  # nothing to speculate when the index confirms the whole prompt
                if nb > chunk:
                    chain = pending.chain(flat)
                pend_at = pending.add_range(slot, chain, 0, chunk)
            approx_worker = bool(hs) and bool(self._approx_slots >> slot & 1)
            if approx_worker:
                approx_at = self._approx_skip(nb, ps)
                self._approx.add(slot, hs[approx_at:approx_at + APPROX_CHUNK_BLOCKS], now,
                                 capacity=self.approx_capacity_blocks or ps.capacity_blocks)
                approx_at = min(nb, approx_at + APPROX_CHUNK_BLOCKS)
            if self._observers:
                rec = FlightRecord(request_id, ps.id, ds.id if ds is not ps else None, uncached, nb, True,
                                   self._left(now, now),
                                   (list(hs) if isinstance(hs, array) else hs)
                                   if (speculated or approx_worker or active is not None) else (),
                                   speculated, approx_worker)
                for o in self._observers:
                    o.on_route(rec)
            self.policy.on_routed(req, fleet, chosen)
            d = self._decided(request_id, ps, ds, num_tokens, chosen.total, chosen.gpu, chosen.host, chosen.disk,
                              chosen.pending, choice.costs, choice.reason, decode_costs, hints)
        self._pending.reap()
        if pend_at < nb or approx_at < nb:
            self._add_chain_rest(ps, slot, hs, chain, pend_at, approx_at)
        return d

    def _route_native(self, token_ids: Any, request_id: Any, lora_name: Any, cache_salt: Any, mm_hashes: Any,
                      hints: RouteHints | None) -> Decision:
        core = _native.core
        bs = self.block_size
        toks, enc = native_prompt(token_ids, bs, lora_name, cache_salt, mm_hashes)
        try:
            h = core.hash_prompt(toks, bs, enc, ROOT_SEED)
        except TypeError:  # a container the core does not read (e.g. a big-endian array)
            h = core.hash_prompt(np.asarray(toks).astype("<u4"), bs, enc, ROOT_SEED)
        with self.lock:
            now, prefill_pool, decode_pool = self._admit(request_id)
            room = hs = None
            if self._active is not None:  # the wait-for-KV-room term: the same Python arithmetic as its reference
                hs = h
                act = self._active.match(h) if len(h) and self.policy.wants_active_overlap(len(h), prefill_pool) else {}
                slot_of = self._slot
                room = self.policy.room_waits(len(h), prefill_pool, [act.get(slot_of[s.id], 0) for s in prefill_pool]
                                              if act else [0] * len(prefill_pool), now)
            tied, reason, costs, best, num_tokens, pend_at = self._core.route(h, now, now, CHAIN_CHUNK_BLOCKS, room)
            nb = len(h)
            if len(tied) == 1:  # the core made the pending add (its first chunk)
                j, total, gpu, host, disk, pend = tied[0]
            else:  # the cost model left a tie: the router's seeded rng breaks it, as on the Python path
                j, total, gpu, host, disk, pend = tied[self._rng.randrange(len(tied))]
                if reason != 3:
                    reason = 0 if best == 0 else (1 if total == best else 2)
                if nb and gpu + host + disk < nb:
                    pend_at = self._pending.add_range(self._slot[prefill_pool[j].id], h, 0, CHAIN_CHUNK_BLOCKS)
            ps = prefill_pool[j]
            decode_costs: dict[Any, float] = {}
            if self._disaggregated:
                ds, decode_costs = choose_decode(nb, decode_pool, self.decode_weights, self._rng)
            else:
                ds = ps
            uncached = max(0, num_tokens - total * bs)
            self._commit(request_id, ps, ds, uncached, nb, now, hs)
            d = self._decided(request_id, ps, ds, num_tokens, total, gpu, host, disk, pend,
                              dict(zip(self._pool_ids, costs)), _native.REASONS[reason], decode_costs, hints)
        self._pending.reap()
        if pend_at < nb:
            self._add_chain_rest(ps, self._slot[ps.id], h, h, pend_at, nb)
        return d

    def _decided(self, request_id: Any, ps: WorkerState, ds: WorkerState, num_tokens: int, total: int, gpu: int,
                 host: int, disk: int, pend: int, costs: dict[Any, float], reason: str,
                 decode_costs: dict[Any, float], hints: RouteHints | None) -> Decision:
        """Under the lock, after the commit: count the decision and describe it (blocks -> tokens).
        Shared by the Python and the compiled decision paths."""
        bs = self.block_size
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
            costs=costs,
            reason=reason,
            policy=self.policy.name,
            num_tokens=num_tokens,
            prefill_worker=ps.id if self._disaggregated else None,
            decode_worker=ds.id if self._disaggregated else None,
            decode_costs=decode_costs,
            hints=hints,
        )

    #: Called between two chunks of a long chain, with the lock released (:meth:`_add_chain_rest`).  The
    #: default gives up the GIL, so threads waiting for it (the sidecar's request loop) run now rather than
    #: after the interpreter's switch interval; tests set a hook on the instance.
    between_chunks: Callable[[], None] = staticmethod(lambda: time.sleep(0))

    def _add_chain_rest(self, ps: WorkerState, slot: int, hs: Any, chain: Any, pend_at: int, approx_at: int,
                        expires_in: float | None = None) -> None:
        """Add the rest of a long chain to the pending table (from ``pend_at``; ``chain``: ``hs`` as
        :meth:`PendingPrefixes.chain` gave it) and to the approximate table (from ``approx_at``), one
        :data:`CHAIN_CHUNK_BLOCKS` chunk per turn of the lock, calling :attr:`between_chunks` before each.
        Other requests route between turns and see a prefix of the chain (a shorter prediction, never a
        wrong one).  Ends early when ``ps`` was removed meanwhile (its slot may belong to another worker
        by then); a pending chain whose added part left the table (its generation rotated out) restarts
        from the root, at most twice (then the prediction stays short: safe).  A caller already holding
        the lock keeps it (the lock is reentrant): same result, without the turns."""
        n = len(hs)
        chunk = CHAIN_CHUNK_BLOCKS
        restarts = 0
        while pend_at < n or approx_at < n:
            self._pending.reap()  # a generation dropped during the last turn is freed outside the lock
            self.between_chunks()
            with self.lock:
                if self._states.get(ps.id) is not ps or self._slot.get(ps.id) != slot:
                    return
                if pend_at < n:
                    nxt = self._pending.add_range(slot, chain, pend_at, pend_at + chunk)
                    if nxt == 0:
                        restarts += 1
                        if restarts > 2:
                            nxt = n
                    pend_at = nxt
                if approx_at < n:
                    if not self._approx_slots >> slot & 1:  # left approximate mode meanwhile
                        approx_at = n
                        continue
                    now = self._clock()
                    self._approx.add(slot, hs[approx_at:approx_at + APPROX_CHUNK_BLOCKS], now,
                                     capacity=self.approx_capacity_blocks or ps.capacity_blocks,
                                     expires_at=None if expires_in is None else now + expires_in)
                    approx_at += APPROX_CHUNK_BLOCKS

    def _admit(self, request_id: Any, exclude: Collection[Any] = ()) -> tuple[float, list[WorkerState], list[WorkerState]]:
        """Under the lock, before a decision: expire stale requests (local and remote), refuse duplicates
        and empty pools; ``exclude`` leaves workers out of this decision's prefill pool."""
        now = self._clock()
        if self.request_ttl_s is not None and self._requests:
            self._expire_requests(now - self.request_ttl_s)
        if self._remote_heap and self._remote_heap[0][0] <= now:
            self._expire_remote(now)
        if request_id in self._requests:
            raise DuplicateRequestError(f"request {request_id!r} is already in flight")
        prefill_pool, decode_pool = self._pools()
        if exclude:
            prefill_pool = [s for s in prefill_pool if s.id not in exclude]
        if not prefill_pool:
            raise NoHealthyWorkerError("no healthy worker can take a prefill")
        if self._disaggregated and not decode_pool:
            raise NoHealthyWorkerError("no healthy decode worker")
        return now, prefill_pool, decode_pool

    def _commit(self, rid: Any, ps: WorkerState, ds: WorkerState, uncached: int, nb: int, now: float,
                hashes: Sequence[int] | None = None) -> None:
        ps.prefill_tokens += uncached
        ps.prefill_requests += 1
        ps.routed_total += 1
        ps.active_requests += 1
        if ds is not ps:
            ds.active_requests += 1
            ds.routed_total += 1
        ds.decode_blocks += nb
        if hashes is not None and self._active is not None:
            if not _native.is_hashes(hashes):  # the flight keeps its own copy (a Hashes object is immutable)
                hashes = list(hashes)
            ds.active_blocks = self._active.add(self._slot[ds.id], hashes)
        self._requests[rid] = _Flight(ps, ds, uncached, nb, now, hashes)
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
            for o in self._observers:
                o.on_release(rid, False)

    def prefill_done(self, request_id: Any) -> None:
        """The request's prefill finished: its prompt no longer queues compute (idempotent)."""
        with self.lock:
            f = self._requests.get(request_id)
            if f is None:
                raise UnknownRequestError(f"unknown request {request_id!r}")
            if f.prefill_open:
                for o in self._observers:
                    o.on_release(request_id, True)
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
            for o in self._observers:
                o.on_release(request_id, False)

    def _release(self, f: _Flight) -> None:
        self._release_prefill(f)
        d = f.decode
        d.decode_blocks -= f.blocks
        d.active_requests -= 1
        if f.hashes is not None and self._active is not None:
            slot = self._slot.get(d.id)
            if slot is not None and self._states.get(d.id) is d:  # a removed worker's table is gone
                d.active_blocks = self._active.remove(slot, f.hashes)
        if self._core is not None and d.id in self._slot and self._states.get(d.id) is d:
            self._sync(d)

    def in_flight(self) -> int:
        return len(self._requests)

    # ------------------------------------------------- replicas, approximate mode
    def add_observer(self, observer: Any) -> None:
        """Tell ``observer`` of every decision (``on_route(FlightRecord)``) and release
        (``on_release(request_id, prefill_only)``), under the lock: it must only enqueue."""
        with self.lock:
            self._observers.append(observer)

    def remove_observer(self, observer: Any) -> None:
        with self.lock:
            self._observers.remove(observer)

    def _left(self, at: float, now: float) -> float | None:
        return None if self.request_ttl_s is None else at + self.request_ttl_s - now

    def local_flights(self) -> list[FlightRecord]:
        """This router's live requests (oldest first), as :meth:`add_observer` reports them (without hashes)."""
        with self.lock:
            now = self._clock()
            return [FlightRecord(rid, f.prefill.id, f.decode.id if f.decode is not f.prefill else None,
                                 f.prefill_tokens, f.blocks, f.prefill_open, self._left(f.at, now))
                    for rid, f in self._requests.items()]

    def track_remote(self, key: Any, worker: Any, *, prefill_tokens: int, blocks: int, ttl_s: float | None,
                     decode_worker: Any = None, prefill_open: bool = True, new_decision: bool = True,
                     hashes: Sequence[int] = ()) -> bool:
        """Count the load of a request another router replica routed (``key``: unique per replica and
        request), released by :meth:`release_remote` or ``ttl_s`` seconds from now (None: never).
        ``new_decision``: also count it in the workers' ``routed_total`` (fair-share tie-breaking; False
        when a peer's state re-announces it).  ``hashes``: the prompt's chain when the peer sent it; it enters
        the active-block table (a policy with ``tracks_active_blocks``) until the release.  Returns False,
        changing nothing, if ``key`` is already tracked (a duplicate message)."""
        for name, v in (("prefill_tokens", prefill_tokens), ("blocks", blocks)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if ttl_s is not None and not ttl_s > 0:
            return False  # already past its deadline (also refuses nan)
        with self.lock:
            if key in self._remote:
                return False
            ps = self._state(worker)
            ds = self._state(decode_worker) if decode_worker is not None else ps
            now = self._clock()
            f = _Flight(ps, ds, prefill_tokens, blocks, now)
            ps.prefill_tokens += prefill_tokens
            ps.prefill_requests += 1
            ps.active_requests += 1
            if ds is not ps:
                ds.active_requests += 1
            ds.decode_blocks += blocks
            if hashes and self._active is not None:
                f.hashes = list(hashes)
                ds.active_blocks = self._active.add(self._slot[ds.id], f.hashes)
            if new_decision:
                ps.routed_total += 1
                if ds is not ps:
                    ds.routed_total += 1
            if not prefill_open:
                self._release_prefill(f)
            self._remote[key] = f
            if ttl_s is not None:
                f.deadline = now + ttl_s
                self._remote_seq += 1
                heapq.heappush(self._remote_heap, (f.deadline, self._remote_seq, key, f))
            return True

    def release_remote(self, key: Any, *, prefill_only: bool = False) -> bool:
        """Release a remote request's load (all of it, or its prefill part); False if not tracked."""
        with self.lock:
            f = self._remote.get(key)
            if f is None:
                return False
            if prefill_only:
                self._release_prefill(f)
                return True
            del self._remote[key]
            self._release(f)
            heap = self._remote_heap
            if len(heap) > 2 * len(self._remote) + 1024:  # drop entries of released flights
                self._remote_heap = [e for e in heap if self._remote.get(e[2]) is e[3]]
                heapq.heapify(self._remote_heap)
            return True

    def remote_keys(self) -> list[Any]:
        with self.lock:
            return list(self._remote)

    def expire_remote(self, now: float | None = None) -> int:
        """Release remote flights past their deadline; returns how many."""
        with self.lock:
            return self._expire_remote(self._clock() if now is None else now)

    def _expire_remote(self, now: float) -> int:
        heap = self._remote_heap
        n = 0
        while heap and heap[0][0] <= now:
            _, _, key, f = heapq.heappop(heap)
            if self._remote.get(key) is f:
                del self._remote[key]
                self._release(f)
                n += 1
        self.expired_remote += n
        return n

    def add_pending(self, worker: Any, hashes: Sequence[int]) -> None:
        """Mark a chain as speculatively cached on ``worker`` (another replica routed it there)."""
        hs = list(hashes)
        n = len(hs)
        with self.lock:
            ps = self._state(worker)
            slot = self._slot[worker]
            chain = self._pending.chain(hs) if n > CHAIN_CHUNK_BLOCKS else hs
            at = self._pending.add_range(slot, chain, 0, CHAIN_CHUNK_BLOCKS)
        self._pending.reap()
        if at < n:
            self._add_chain_rest(ps, slot, hs, chain, at, n)

    def set_approximate(self, worker: Any, approximate: bool = True) -> None:
        """Predict ``worker``'s cache from routing decisions (no KV events, or a stale stream) or, with
        False, trust the index alone again (its predicted entries are dropped)."""
        with self.lock:
            self._state(worker)
            slot = self._slot[worker]
            if approximate:
                self._approx_slots |= 1 << slot
            elif self._approx_slots >> slot & 1:
                self._approx_slots &= ~(1 << slot)
                self._approx.forget(slot)

    def approximate_workers(self) -> list[Any]:
        with self.lock:
            return [w for w, s in self._slot.items() if self._approx_slots >> s & 1]

    def add_approx(self, worker: Any, hashes: Sequence[int], ttl_s: float | None = None) -> bool:
        """Record a chain as predicted on an approximate-mode ``worker`` for ``ttl_s`` (default the TTL);
        False (nothing recorded) when the worker is not in approximate mode here."""
        with self.lock:
            s = self._state(worker)
            slot = self._slot[worker]
            if not self._approx_slots >> slot & 1:
                return False
            now = self._clock()
            hs = list(hashes)
            at = self._approx_skip(len(hs), s)
            self._approx.add(slot, hs[at:at + APPROX_CHUNK_BLOCKS], now,
                             capacity=self.approx_capacity_blocks or s.capacity_blocks,
                             expires_at=None if ttl_s is None else now + ttl_s)
        if len(hs) > at + APPROX_CHUNK_BLOCKS:
            self._add_chain_rest(s, slot, hs, hs, len(hs), at + APPROX_CHUNK_BLOCKS, ttl_s)
        return True

    def _approx_skip(self, n: int, ws: WorkerState) -> int:
        """Where an approximate-mode chain of ``n`` blocks starts entering the table: a chain longer than
        the worker's bound ends with only its last ``capacity`` blocks held (each insert evicts the least
        recently routed block, the chain's own root first), so the blocks before those are not inserted
        only to be evicted again (same table at the end; ``evicted`` counts the entries that left)."""
        cap = self.approx_capacity_blocks or ws.capacity_blocks or self._approx.default_capacity
        return max(0, n - cap)

    def approx_dump(self, worker: Any) -> list[tuple[int, float]]:
        """An approximate worker's predicted blocks: ``(hash, seconds left)``, oldest first."""
        with self.lock:
            self._state(worker)
            return self._approx.dump(self._slot[worker], self._clock())

    def approx_load(self, worker: Any, entries: Iterable[tuple[int, float]]) -> bool:
        """Add a peer's :meth:`approx_dump` (catch-up); False when ``worker`` is not approximate here."""
        with self.lock:
            s = self._state(worker)
            slot = self._slot[worker]
            if not self._approx_slots >> slot & 1:
                return False
            self._approx.load(slot, entries, self._clock(), self.approx_capacity_blocks or s.capacity_blocks)
            return True

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
                "remote_in_flight": len(self._remote),
                "expired_remote": self.expired_remote,
                "approximate_workers": [str(w) for w, s in self._slot.items() if self._approx_slots >> s & 1],
                "approx_entries": len(self._approx),
                "disaggregated": self._disaggregated,
                "workers": [s.to_dict() for s in sorted(self._states.values(), key=lambda s: s.order)],
            }


def _add_approx(cands: list[Candidate], approx: dict[int, int], slot_of: dict[Any, int]) -> None:
    """Count predicted (approximate-mode) blocks as GPU hits where they reach beyond the index."""
    for c in cands:
        ad = approx.get(slot_of[c.worker], 0)
        conf = c.gpu + c.host + c.disk
        if ad > conf:
            c.gpu += ad - conf
            if ad > c.total:
                c.total = ad
            c.pending = c.total - ad
