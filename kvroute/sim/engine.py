"""The discrete-event cluster simulator: real router, real caches, simulated time.

Parts (one :class:`Simulation` per (routing, eviction) run):

* the *router* is :class:`kvroute.router.Router` with the chosen policy; its
  clock is the simulated clock, and its CPU time per decision is measured;
* each *worker* owns a :class:`kvroute.eviction.TieredCache` (GPU and host
  capacity in blocks, the chosen eviction policy) whose stored/removed events go
  into ``router.index`` through :func:`kvroute.eviction.index_follower`
  (``KVIndex.store``/``remove``: the trace's ``hash_ids`` are already
  prefix-chained, so they serve as content hashes and engine hashes alike).
  Like an engine, a worker publishes the events of a prefill when that step
  ends (plus ``event_lag_s``), so between a decision and the events the router
  relies on its speculative prefixes;
* with ``router_replicas`` K > 1, K routers (active-active replicas) each keep
  their own index fed by every worker's events, requests are spread over them
  round robin, and each request's ``prefill_done``/``finish`` goes to the
  replica that routed it; with ``replica_sync = "shared"`` each replica's
  :class:`kvroute.sync.ReplicaSync` batches reach the others ``sync_delay_s``
  later (``SYNC`` events), as over a Redis stream; with ``"none"`` every replica
  knows only its own decisions;
* with ``approximate`` the routers get no KV events at all: every worker is in
  approximate mode (a cache predicted from decisions, TTL and capacity bound);
* time is advanced by a heap of events: ``ARRIVE`` (trace timestamp / rate
  scale), ``PREFILL_DONE``, ``DECODE_DONE`` (a run of decode steps of the whole
  batch), ``TRANSFER_DONE`` (prefill -> decode KV transfer, disaggregated only),
  ``KV_EVENTS`` (delayed event delivery to the router), ``SYNC`` (a replica's
  sync batch reaching the others), ``SCRAPE`` (periodic load reports, with
  ``load_report_period_s``).

Worker model (vLLM-like, iteration level): a FIFO prefill queue with priority
over decode (a waiting prompt is prefilled at the next decode-step boundary,
one prompt at a time) once the GPU has room for its blocks beside those of the
requests in flight; the running requests decode together, one token each per
step, the step time given by the cost model for the batch's size and context.
A run of decode steps is one event; an arrival cuts it at the next step
boundary.  With ``chunked_prefill_tokens`` a prompt is instead computed in
chunks that share each step with the running decodes (vLLM's chunked prefill:
decodes first, the prompt gets the rest of the token budget), one event per
step.  Simplifications (see docs/results.md): decode tokens do not occupy the
prefix cache, prompts are not batched with each other.

Hits are counted in trace blocks (hash ids): the longest prefix found on the
GPU, then continued on the host tier.  With ``vllm_last_block`` a fully cached
prompt counts one block less (vLLM recomputes the last block).
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..kvindex.errors import KVRouteError
from .cost import CostModel, get_preset, DEFAULT_PRESET
from .metrics import Records, Summary, summarize
from ..traces import Request

#: The router's own CPU time is measured on this thread's CPU clock (not wall time, which other
#: processes on a shared machine would inflate).
_cpu_ns = time.thread_time_ns

ARRIVE, PREFILL_DONE, DECODE_DONE, TRANSFER_DONE, KV_EVENTS, STEP_DONE, SYNC, SCRAPE = 0, 1, 2, 3, 4, 5, 6, 7

#: Values of ``SimConfig.replica_sync``.
REPLICA_SYNC_MODES = ("none", "shared")
_IDLE, _PREFILL, _DECODE = 0, 1, 2

#: Eviction policies that need the future of the one cache they serve (see ``_policy_factory``).
ORACLES = frozenset({"belady"})


class SimConfigError(KVRouteError, ValueError):
    """An impossible simulation configuration."""


@dataclass
class SimConfig:
    """One simulation's settings.  Built by the CLI or a caller; read-only once a run starts."""

    #: Number of workers (all of them; with ``prefill_workers`` > 0 the rest form the decode pool).
    workers: int = 8
    #: Routing policy name (a key of ``kvroute.router.POLICIES``).
    routing: str = "kvroute"
    #: Eviction policy name (a key of ``kvroute.eviction.POLICIES``).
    eviction: str = "lru"
    #: GPU KV capacity per worker in blocks; None: what fits next to the weights (cost model).
    gpu_blocks: int | None = None
    #: Host KV capacity per worker in blocks; None: the cost model's host memory; 0: no host tier.
    host_blocks: int | None = None
    #: Tokens per trace block (hash id): 512 for the Mooncake traces.
    block_tokens: int = 512
    #: Arrival times are divided by this (2.0 = twice the trace's request rate).
    rate_scale: float = 1.0
    #: Cost constants of every worker.
    cost: CostModel = field(default_factory=lambda: get_preset(DEFAULT_PRESET))
    #: Serve requests one at a time (each arrives when the previous finished), ignoring timestamps.
    serial: bool = False
    #: Count a fully cached prompt as one block short (vLLM recomputes its last block).
    vllm_last_block: bool = False
    #: Let the eviction policy refuse blocks on the GPU tier.  False (default): as in an engine, whose GPU
    #: pool holds every block a request computes while it runs; the policy then only orders GPU evictions
    #: (host-tier admission applies either way).
    gpu_admission: bool = False
    #: Prefill pool size for prefill/decode disaggregation (0: aggregated workers).
    prefill_workers: int = 0
    #: Most requests decoding at once on a worker (vLLM's max_num_seqs).
    max_batch: int = 256
    #: Chunked prefill token budget per step (vLLM's max_num_batched_tokens); 0: off, a prompt is
    #: prefilled whole while decode waits.  Aggregated workers only (a prefill-only worker has no decode).
    chunked_prefill_tokens: int = 0
    #: Router weights (the policy's dataclass fields) and eviction policy parameters.
    router_params: dict[str, Any] = field(default_factory=dict)
    eviction_params: dict[str, Any] = field(default_factory=dict)
    #: Seed of the router's tie-breaking.
    seed: int = 0
    #: Send worker load reports (waiting and running requests) to the router.
    report_load: bool = True
    #: When: 0 after each state change of a worker (an engine that pushes its load); P > 0 every P
    #: seconds for all workers at once (a router scraping the engines' Prometheus metrics, as
    #: ``kvroute proxy --scrape-interval`` does: the router sees loads up to P seconds old).
    load_report_period_s: float = 0.0
    #: Seconds between the end of the prefill step that cached blocks and the router applying those
    #: events (engine publish + network); the router's speculative prefixes cover the gap.
    event_lag_s: float = 0.0
    #: Set the per-token time constants of routing policies that have them (kvroute, preble) from the
    #: cost model, as a deployment configures them for its model and GPU; explicit router_params win.
    calibrate_router: bool = True
    #: Router replicas (active-active); requests are spread over them round robin.
    router_replicas: int = 1
    #: What replicas share: ``none`` (each knows its own decisions only) or ``shared`` (kvroute.sync).
    replica_sync: str = "shared"
    #: Seconds from a replica's decision (or release) to the other replicas applying it.
    sync_delay_s: float = 0.0
    #: Approximate mode: the routers receive no KV events and predict every cache from their decisions.
    approximate: bool = False
    #: Lifetime of an approximate entry, seconds (kvroute.router.approx).
    approx_ttl_s: float = 600.0

    def resolved_gpu_blocks(self) -> int:
        return self.gpu_blocks if self.gpu_blocks is not None else self.cost.gpu_blocks(self.block_tokens)

    def resolved_host_blocks(self) -> int:
        return self.host_blocks if self.host_blocks is not None else self.cost.host_blocks(self.block_tokens)

    def validate(self) -> None:
        if self.block_tokens < 1 or self.max_batch < 1:  # first: the capacity defaults divide by block_tokens
            raise SimConfigError("block_tokens and max_batch must be >= 1")
        if self.workers < 1:
            raise SimConfigError("need at least one worker")
        if not isinstance(self.gpu_admission, bool):
            raise SimConfigError(f"gpu_admission must be a bool, got {self.gpu_admission!r}")
        if self.prefill_workers < 0 or (self.prefill_workers and self.prefill_workers >= self.workers):
            raise SimConfigError("prefill_workers must leave at least one decode worker")
        if not 0 < self.rate_scale < math.inf:  # also refuses nan
            raise SimConfigError("rate_scale must be a finite number > 0")
        if self.resolved_gpu_blocks() < 1:
            raise SimConfigError("gpu_blocks must be >= 1 (the model does not fit the GPU?)")
        if self.resolved_host_blocks() < 0:
            raise SimConfigError("host_blocks must be >= 0")
        if self.eviction in ORACLES and (self.prefill_workers or self.workers) > 1:
            raise SimConfigError(f"{self.eviction} is an offline oracle over one cache's future: it runs with "
                                 "one (prefill) worker only")
        if self.chunked_prefill_tokens < 0:
            raise SimConfigError("chunked_prefill_tokens must be >= 0")
        if not 0 <= self.event_lag_s < math.inf:
            raise SimConfigError("event_lag_s must be a finite number >= 0")
        if not 0 <= self.load_report_period_s < math.inf:
            raise SimConfigError("load_report_period_s must be a finite number >= 0")
        if not isinstance(self.router_replicas, int) or self.router_replicas < 1:
            raise SimConfigError("router_replicas must be an int >= 1")
        if self.replica_sync not in REPLICA_SYNC_MODES:
            raise SimConfigError(f"replica_sync must be one of {REPLICA_SYNC_MODES}, got {self.replica_sync!r}")
        if not 0 <= self.sync_delay_s < math.inf:
            raise SimConfigError("sync_delay_s must be a finite number >= 0")
        if not 0 < self.approx_ttl_s < math.inf:
            raise SimConfigError("approx_ttl_s must be a finite number > 0")


class _Worker:
    """State of one simulated worker.  Owned by :class:`Simulation`."""

    __slots__ = ("idx", "wid", "cache", "queue", "running", "joining", "mode", "gen", "epoch_start",
                 "step_s", "epoch_steps", "ctx_sum", "cut", "prefill_role", "decode_role", "pins", "outbox",
                 "in_transit", "follower", "chunk_req", "chunk_left", "chunk_pos", "chunk_reload", "chunk_step",
                 "private", "kv_blocks")

    def __init__(self, idx: int, wid: Any, cache: Any, prefill_role: bool, decode_role: bool) -> None:
        self.idx = idx
        #: The worker's id in the router and the index.
        self.wid = wid
        #: Its TieredCache (None for a decode-only worker).
        self.cache = cache
        #: Requests waiting for prefill (request indices), FIFO.
        self.queue: deque[int] = deque()
        #: Decoding requests: [request index, tokens left, context tokens].
        self.running: list[list[int]] = []
        #: Requests whose KV arrived (disaggregated) and join the batch at the next step boundary.
        self.joining: list[int] = []
        #: What the worker is doing: _IDLE, _PREFILL (a prefill or chunked step in flight), _DECODE.
        self.mode = _IDLE
        #: Generation counter: a DECODE_DONE/STEP_DONE event of an older generation is stale.
        self.gen = 0
        #: The decode run in flight: start time, seconds per step, steps planned.
        self.epoch_start = 0.0
        self.step_s = 0.0
        self.epoch_steps = 0
        #: Sum of the context tokens of the running requests.
        self.ctx_sum = 0
        #: Whether the current decode run was already cut short.
        self.cut = False
        #: Pools: whether the worker prefills (has a cache) and decodes.
        self.prefill_role = prefill_role
        self.decode_role = decode_role
        #: Blocks pinned by this worker's requests in flight -> number of requests pinning them
        #: (mirrors the cache's pins; sizes the room a new prompt has).
        self.pins: dict[Any, int] = {}
        #: Blocks of requests in flight that the cache did not keep (admission refused): private KV.
        self.private = 0
        #: Decode-only worker: KV blocks held by its running requests (transferred prompts).
        self.kv_blocks = 0
        #: Event batches of the cache not yet published (the current prefill's).
        self.outbox: list[Any] = []
        #: Published batches on their way to the router: (delivery time, batches), in order.
        self.in_transit: deque[tuple[float, list[Any]]] = deque()
        #: Applies one batch to the router's index (``index_follower``).
        self.follower: Callable[[Any], None] | None = None
        #: Chunked prefill: the request being prefilled (-1: none), its prompt tokens left to compute,
        #: tokens already in KV, host reload seconds still to pay, tokens of the step in flight.
        self.chunk_req = -1
        self.chunk_left = 0
        self.chunk_pos = 0
        self.chunk_reload = 0.0
        self.chunk_step = 0


class Simulation:
    """Replays ``requests`` through a simulated cluster under ``config``.

    ``progress`` (optional) is called with the number of requests finished since
    its last call (a tqdm ``update``).  Use :meth:`run` once.
    """

    def __init__(self, requests: Sequence[Request], config: SimConfig,
                 progress: Callable[[int], Any] | None = None) -> None:
        config.validate()
        from ..eviction import TieredCache, index_follower  # top floor: import the real parts
        from ..router import Router

        self.requests = requests
        self.cfg = config
        self.cost = config.cost
        self.progress = progress
        self.now = 0.0
        n = config.workers
        npre = config.prefill_workers
        self.disaggregated = npre > 0
        self.gpu_blocks = config.resolved_gpu_blocks()
        self.host_blocks = config.resolved_host_blocks()
        wids = [f"w{i}" for i in range(n)]
        roles = {}
        if self.disaggregated:
            roles = {wid: ("prefill" if i < npre else "decode") for i, wid in enumerate(wids)}
        try:
            #: The router replicas (one unless ``router_replicas`` > 1); ``router`` is the first.
            # each replica its own tie-breaking seed (seed + k): replicas sharing a seed would break the
            # ties of simultaneous requests identically and herd them onto one worker
            self.routers = [_make_router(Router, wids, dataclasses.replace(config, seed=config.seed + k), roles,
                                         lambda: self.now) for k in range(config.router_replicas)]
        except (TypeError, ValueError) as exc:  # a tuned configuration's unknown or bad weight
            raise SimConfigError(f"routing {config.routing!r} with {config.router_params}: {exc}") from None
        self.router = self.routers[0]
        self.index = self.router.index
        if config.approximate:
            for r in self.routers:
                for wid in r.workers():
                    r.set_approximate(wid)
        #: Each replica's ReplicaSync (shared mode with several replicas), else empty.
        self.syncs: list[Any] = []
        if config.router_replicas > 1 and config.replica_sync == "shared":
            from ..sync import ReplicaSync

            # leases and heartbeats play no part: simulated replicas never die
            self.syncs = [ReplicaSync(r, f"r{k}", clock=lambda: self.now, lease_s=1e18, heartbeat_s=1e17,
                                      incarnation="0", wall=lambda: self.now) for k, r in enumerate(self.routers)]
        self._owner: dict[int, int] = {}
        self._sync_batches: dict[int, tuple[int, bytes]] = {}
        self._sync_next = 0
        self.workers: list[_Worker] = []
        self.by_id: dict[Any, _Worker] = {}
        for i, wid in enumerate(wids):
            pre = not self.disaggregated or i < npre
            dec = not self.disaggregated or i >= npre
            cache = None
            if pre:
                try:
                    cache = TieredCache(
                        self.gpu_blocks, self.host_blocks, policy=_policy_factory(config, requests),
                        on_event=None, gpu_admission=config.gpu_admission,
                    )
                except (TypeError, ValueError) as exc:  # a tuned configuration's unknown or bad parameter
                    raise SimConfigError(f"eviction {config.eviction!r} with {config.eviction_params}: {exc}") from None
            w = _Worker(i, wid, cache, pre, dec)
            if cache is not None:
                # the cache's events wait in the worker's outbox until the prefill that caused them is done
                cache.on_event = w.outbox.append
                # approximate mode: the engines publish no KV events (the routers predict from decisions)
                w.follower = _drop_events if config.approximate else \
                    _fan_out([index_follower(r.index, wid) for r in self.routers])
            self.workers.append(w)
            self.by_id[wid] = w
        self.rec = Records(len(requests), n)
        self._heap: list[tuple[float, int, int, int, int]] = []
        self._seq = 0
        #: request index -> (prefill worker, decode worker)
        self._placement: dict[int, tuple[_Worker, _Worker]] = {}
        #: request index -> its cache ticket on the prefill worker (until the blocks are released)
        self._tickets: dict[int, Any] = {}
        self._finished = 0
        self._pending_progress = 0

    # ----------------------------------------------------------- plumbing
    def _push(self, t: float, kind: int, a: int, b: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, a, b))

    # ---------------------------------------------------------------- run
    def run(self) -> Records:
        """Simulate every request to completion; returns the per-request records."""
        reqs = self.requests
        if not reqs:
            return self.rec
        if self.cfg.serial:
            self._push(0.0, ARRIVE, 0)
        else:
            t0 = reqs[0].arrival_s
            scale = self.cfg.rate_scale
            for i, r in enumerate(reqs):
                self._push((r.arrival_s - t0) / scale, ARRIVE, i)
        if self.cfg.report_load and self.cfg.load_report_period_s > 0:
            self._push(self.cfg.load_report_period_s, SCRAPE, 0)
        heap = self._heap
        pop = heapq.heappop
        while heap:
            t, _, kind, a, b = pop(heap)
            self.now = t
            if kind == ARRIVE:
                self._arrive(a)
            elif kind == PREFILL_DONE:
                self._prefill_done(self.workers[a], b)
            elif kind == DECODE_DONE:
                self._decode_done(self.workers[a], b)
            elif kind == STEP_DONE:
                self._step_done(self.workers[a], b)
            elif kind == TRANSFER_DONE:
                self._transfer_done(self.workers[a], b)
            elif kind == SYNC:
                self._sync_arrive(a)
            elif kind == SCRAPE:
                self._scrape()
            else:
                self._deliver(self.workers[a])
        if self.progress and self._pending_progress:
            self.progress(self._pending_progress)
        return self.rec

    # ------------------------------------------------------------- events
    def _arrive(self, i: int) -> None:
        r = self.requests[i]
        rec = self.rec
        now = self.now
        rec.arrival[i] = now
        rec.blocks[i] = len(r.hash_ids)
        rec.input_tokens[i] = r.input_length
        k = i % len(self.routers)
        self._owner[i] = k
        t0 = _cpu_ns()
        d = self.routers[k].route_hashes(list(r.hash_ids), num_tokens=r.input_length, request_id=i)
        rec.router_ns[i] = _cpu_ns() - t0
        if self.syncs:
            self._sync_publish(k)
        pw = self.by_id[d.worker]
        dw = self.by_id[d.decode_worker] if (self.disaggregated and d.decode_worker is not None) else pw
        rec.worker[i] = pw.idx
        rec.decode_worker[i] = dw.idx
        rec.predicted_cached[i] = d.predicted_cached_tokens
        self._placement[i] = (pw, dw)
        pw.queue.append(i)
        self._kick(pw)

    def _kick(self, w: _Worker) -> None:
        """Something changed for ``w``: start work if idle, or cut a decode run short."""
        if w.mode == _IDLE:
            self._start_next(w)
        elif w.mode == _DECODE and not w.cut:
            # a prompt (or a transferred request) waits: stop at the next step boundary
            done = math.ceil((self.now - w.epoch_start) / w.step_s - 1e-9) if w.step_s > 0 else 0
            done = max(done, 0)
            if done < w.epoch_steps:
                w.gen += 1
                w.epoch_steps = done
                w.cut = True
                self._push(w.epoch_start + done * w.step_s, DECODE_DONE, w.idx, w.gen)

    def _start_next(self, w: _Worker) -> None:
        now = self.now
        cfg = self.cfg
        if w.joining:
            # transferred requests join in arrival order while the batch and the GPU's KV have room
            k = 0
            reqs = self.requests
            while k < len(w.joining) and len(w.running) < cfg.max_batch:
                nb = len(reqs[w.joining[k]].hash_ids)
                if w.kv_blocks + nb > self.gpu_blocks and w.running:
                    break
                w.kv_blocks += nb
                self._join(w, w.joining[k])
                k += 1
            del w.joining[:k]
        if w.chunk_req >= 0:  # chunked prefill in progress: one more mixed step
            self._mixed_step(w)
            return
        while w.queue and (self.disaggregated or len(w.running) < cfg.max_batch):
            i = w.queue[0]
            started = self._begin_prefill(w, i)
            if started is None:  # no KV room now: the head waits for running requests to free blocks
                break
            w.queue.popleft()
            if started is False:  # can never fit: dropped
                continue
            new, cached, reload = started  # type: ignore[misc]
            if cfg.chunked_prefill_tokens and not self.disaggregated:
                w.chunk_req, w.chunk_left, w.chunk_pos, w.chunk_reload = i, new, cached, reload
                self._mixed_step(w)
                return
            t = self.cost.prefill_s(new, cached) + reload
            w.mode = _PREFILL
            self.rec.busy_prefill[w.idx] += t
            self._push(now + t, PREFILL_DONE, w.idx, i)
            self._report(w)
            return
        if w.running:
            w.mode = _DECODE
            w.cut = False
            w.gen += 1
            w.step_s = self.cost.decode_step_s(len(w.running), w.ctx_sum)
            w.epoch_start = now
            w.epoch_steps = min(x[1] for x in w.running)
            self._push(now + w.epoch_steps * w.step_s, DECODE_DONE, w.idx, w.gen)
        else:
            w.mode = _IDLE
        self._report(w)

    def _begin_prefill(self, w: _Worker, i: int) -> tuple[int, int, float] | bool | None:
        """Look the prompt up in ``w``'s cache, pin its hits and insert the rest.

        Like vLLM's scheduler, a prompt starts only when the GPU has room for
        its blocks beside the blocks running requests hold (pinned); else it
        waits (returns None).  Returns ``(new tokens, cached tokens, host
        reload seconds)``, or False when the prompt is longer than the whole
        GPU cache (the request is dropped and counted).
        """
        r = self.requests[i]
        keys = r.hash_ids
        n = len(keys)
        cache = w.cache
        if n > self.gpu_blocks:
            self._drop(i)
            return False
        pins = w.pins
        if pins or w.private:
            need = n - sum(1 for k in keys if k in pins)
            if need > self.gpu_blocks - len(pins) - w.private:
                return None
        tk = cache.start_request(keys, self.now)
        # blocks the cache did not keep (admission refused, no room) still hold KV while the request runs
        w.private += tk.uncached
        for k in tk.pinned:
            pins[k] = pins.get(k, 0) + 1
        self._tickets[i] = tk
        gpu, host = tk.gpu_hit, tk.host_hit
        hit = gpu + host
        if self.cfg.vllm_last_block and hit >= n:
            if host:
                host -= 1
            else:
                gpu -= 1
            hit -= 1
        bt = self.cfg.block_tokens
        cached_tokens = min(hit * bt, r.input_length - 1) if hit else 0
        # the host part is the tail of the cached prefix (cut to input_length - 1 with a partial last block)
        host_tokens = cached_tokens - min(gpu * bt, cached_tokens)
        new = r.input_length - cached_tokens
        rec = self.rec
        rec.gpu_hit[i] = gpu
        rec.host_hit[i] = host
        return new, cached_tokens, self.cost.reload_s(host_tokens)

    def _publish(self, w: _Worker) -> None:
        """The step ended: the cache's events of this prefill leave for the router (after ``event_lag_s``)."""
        if not w.outbox:
            return
        batches = w.outbox[:]
        w.outbox.clear()  # the cache appends to this very list
        lag = self.cfg.event_lag_s
        if lag <= 0:
            for b in batches:
                w.follower(b)  # type: ignore[misc]
            return
        w.in_transit.append((self.now + lag, batches))
        self._push(self.now + lag, KV_EVENTS, w.idx)

    def _deliver(self, w: _Worker) -> None:
        while w.in_transit and w.in_transit[0][0] <= self.now + 1e-12:
            for b in w.in_transit.popleft()[1]:
                w.follower(b)  # type: ignore[misc]

    def _mixed_step(self, w: _Worker) -> None:
        """Schedule one chunked-prefill step: every running request decodes a token, the prompt gets the rest."""
        budget = self.cfg.chunked_prefill_tokens
        b = len(w.running)
        chunk = min(w.chunk_left, max(1, budget - b))
        t = self.cost.step_s(chunk, w.chunk_pos, b, w.ctx_sum) + w.chunk_reload
        w.chunk_reload = 0.0
        w.chunk_step = chunk
        w.mode = _PREFILL
        w.gen += 1
        self.rec.busy_prefill[w.idx] += t
        self._push(self.now + t, STEP_DONE, w.idx, w.gen)
        self._report(w)

    def _step_done(self, w: _Worker, gen: int) -> None:
        if gen != w.gen:  # pragma: no cover - mixed steps are never cut
            return
        chunk = w.chunk_step
        if w.running:
            keep = []
            for x in w.running:
                x[1] -= 1
                x[2] += 1
                if x[1] <= 0:
                    w.ctx_sum -= x[2] - 1
                    self._finish(x[0])
                else:
                    w.ctx_sum += 1
                    keep.append(x)
            w.running = keep
        w.chunk_left -= chunk
        w.chunk_pos += chunk
        if w.chunk_left <= 0:
            i = w.chunk_req
            w.chunk_req = -1
            self._prefill_done(w, i)
            return
        w.mode = _IDLE
        self._start_next(w)

    def _prefill_done(self, w: _Worker, i: int) -> None:
        now = self.now
        r = self.requests[i]
        self._publish(w)
        self.rec.first_token[i] = now
        self._router_of(i).prefill_done(i)
        if self.syncs:
            self._sync_publish(self._owner[i])
        w.mode = _IDLE
        _, dw = self._placement[i]
        if self.disaggregated:
            self._push(now + self.cost.transfer_s(r.input_length), TRANSFER_DONE, dw.idx, i)
        elif r.output_length <= 1:
            self._finish(i)
        else:
            self._join(w, i)
        self._start_next(w)

    def _join(self, w: _Worker, i: int) -> None:
        r = self.requests[i]
        if r.output_length <= 1:
            self._finish(i)
            return
        ctx = r.input_length + 1
        w.running.append([i, r.output_length - 1, ctx])
        w.ctx_sum += ctx

    def _transfer_done(self, dw: _Worker, i: int) -> None:
        pw, _ = self._placement[i]
        self._release(pw, i)  # the prefill worker lets go of the prompt's blocks
        self._kick(pw)
        dw.joining.append(i)
        self._kick(dw)

    def _decode_done(self, w: _Worker, gen: int) -> None:
        if gen != w.gen:
            return
        steps = w.epoch_steps
        self.rec.busy_decode[w.idx] += steps * w.step_s
        if steps:
            keep = []
            for x in w.running:
                x[1] -= steps
                x[2] += steps
                if x[1] <= 0:
                    w.ctx_sum -= x[2] - steps
                    self._finish(x[0])
                else:
                    w.ctx_sum += steps
                    keep.append(x)
            w.running = keep
        w.mode = _IDLE
        self._start_next(w)

    def _finish(self, i: int) -> None:
        rec = self.rec
        rec.finish[i] = self.now
        rec.finished_count[i] += 1
        rec.output_tokens[i] = max(1, self.requests[i].output_length)
        self._router_finish(i)
        pw, dw = self._placement.pop(i)
        if self.disaggregated:
            dw.kv_blocks -= len(self.requests[i].hash_ids)
        else:
            self._release(pw, i)
        self._after_request()

    def _release(self, w: _Worker, i: int) -> None:
        tk = self._tickets.pop(i)
        w.cache.finish_request(tk, self.now)
        w.private -= tk.uncached
        pins = w.pins
        for k in tk.pinned:
            c = pins[k] - 1
            if c:
                pins[k] = c
            else:
                del pins[k]

    def _drop(self, i: int) -> None:
        self.rec.dropped += 1
        self._router_finish(i)
        self._placement.pop(i, None)
        self._after_request()

    def _after_request(self) -> None:
        self._finished += 1
        self._pending_progress += 1
        if self.progress and self._pending_progress >= 256:
            self.progress(self._pending_progress)
            self._pending_progress = 0
        if self.cfg.serial and self._finished < len(self.requests):
            self._push(self.now, ARRIVE, self._finished)

    def _report(self, w: _Worker, *, scrape: bool = False) -> None:
        if not self.cfg.report_load or (self.cfg.load_report_period_s > 0 and not scrape):
            return
        # what vLLM reports (num_requests_waiting / running); KV usage is left to the router's own estimate
        for r in self.routers:  # every replica scrapes every engine
            r.update_load(w.wid, waiting=len(w.queue), running=len(w.running))

    def _scrape(self) -> None:
        """Every worker's load reaches the routers at once; the next scrape while requests remain."""
        for w in self.workers:
            self._report(w, scrape=True)
        if self._finished < len(self.requests):
            self._push(self.now + self.cfg.load_report_period_s, SCRAPE, 0)

    # ------------------------------------------------------------- replicas
    def _router_of(self, i: int) -> Any:
        return self.routers[self._owner[i]]

    def _router_finish(self, i: int) -> None:
        k = self._owner.pop(i)
        self.routers[k].finish(i)
        if self.syncs:
            self._sync_publish(k)

    def _sync_publish(self, k: int) -> None:
        """Replica ``k``'s queued ops leave as one batch; the others apply it ``sync_delay_s`` later."""
        s = self.syncs[k]
        if not s.has_output():
            return
        b = s.take_batch(self.now)
        delay = self.cfg.sync_delay_s
        if delay <= 0:
            self._sync_apply(k, b)
            return
        self._sync_next += 1
        self._sync_batches[self._sync_next] = (k, b)
        self._push(self.now + delay, SYNC, self._sync_next)

    def _sync_arrive(self, bid: int) -> None:
        k, b = self._sync_batches.pop(bid)
        self._sync_apply(k, b)

    def _sync_apply(self, k: int, b: bytes) -> None:
        for j, s in enumerate(self.syncs):
            if j != k:
                s.receive(b, self.now)
        for j, s in enumerate(self.syncs):  # a state query's answer, if any (never in a fault-free run)
            if j != k and s.has_output():
                self._sync_publish(j)


def _drop_events(batch: Any) -> None:
    """The follower of an engine without KV events."""


def _fan_out(followers: list[Callable[[Any], None]]) -> Callable[[Any], None]:
    """One worker's event batches applied to every replica's index (each replica consumes every engine)."""
    if len(followers) == 1:
        return followers[0]

    def apply(batch: Any) -> None:
        for f in followers:
            f(batch)

    return apply


def _make_router(Router: Any, wids: list[str], cfg: SimConfig, roles: dict[str, str], clock: Callable[[], float]) -> Any:
    kw: dict[str, Any] = {"policy": cfg.routing, "clock": clock, "seed": cfg.seed,
                          "capacity_blocks": cfg.resolved_gpu_blocks(), "approx_ttl_s": cfg.approx_ttl_s,
                          # a worker's cache is both tiers: approximate mode predicts GPU + host blocks
                          "approx_capacity_blocks": cfg.resolved_gpu_blocks() + cfg.resolved_host_blocks()}
    weights = calibrated_router_params(cfg.routing, cfg.cost) if cfg.calibrate_router else {}
    weights.update(cfg.router_params)
    if weights:
        kw["weights"] = weights
    if roles:
        kw["decode_workers"] = [w for w in wids if roles[w] == "decode"]
        wids = [w for w in wids if roles[w] == "prefill"]
    return Router(wids, cfg.block_tokens, **kw)


def calibrated_router_params(routing: str, cost: CostModel) -> dict[str, float]:
    """Per-token time constants of a routing policy's weights, derived from ``cost``.

    Only fields the policy's weights dataclass declares are set:
    ``prefill_s_per_token`` (weight FLOPs per token over effective compute),
    ``host_reload_s_per_token`` (KV bytes per token over PCIe) and
    ``decode_s_per_token`` (KV bytes per token over effective HBM bandwidth).
    """
    import dataclasses

    from ..router.policies import policy_class

    cls = policy_class(routing)
    W = getattr(cls, "Weights", None)
    if W is None or not dataclasses.is_dataclass(W):
        return {}
    names = {f.name for f in dataclasses.fields(W)}
    derived = {
        "prefill_s_per_token": 2.0 * cost.params / (cost.tp * cost.gpu_flops * cost.prefill_mfu),
        "host_reload_s_per_token": cost.kv_bytes_per_token / (cost.tp * cost.pcie_bytes_per_s),
        "decode_s_per_token": cost.kv_bytes_per_token / (cost.tp * cost.hbm_bytes_per_s * cost.decode_bw_efficiency),
    }
    return {k: v for k, v in derived.items() if k in names}


def _policy_factory(cfg: SimConfig, requests: Sequence[Request]) -> Callable[[], Any]:
    """Zero-argument factory of the eviction policy (with its tuned parameters).

    The ``belady`` oracle gets the whole workload's future (every request's
    blocks in arrival order, less those too long for the GPU, which are dropped
    unseen); it counts requests by its ``begin`` calls, which
    matches that order only on a single cache served first come first served,
    so :meth:`SimConfig.validate` allows it with one prefill worker only (a
    worker's own future depends on the routing).
    """
    from ..eviction import make_policy

    params = dict(cfg.eviction_params)
    if cfg.eviction == "belady" and "future" not in params:
        # a prompt longer than the GPU cache is dropped before it reaches the cache: not in its future
        cap = cfg.resolved_gpu_blocks()
        params["future"] = [r.hash_ids for r in requests if len(r.hash_ids) <= cap]
    name = cfg.eviction
    return lambda: make_policy(name, **params)


def _cache_report(sim: Simulation) -> dict[str, Any]:
    """The workers' cache counters, summed (``TieredCache.stats()``: hits, inserted, refused, demoted...),
    and, for a policy that follows a duel of experts (``adaptive`` on two tiers), how many workers' caches
    ended following each expert."""
    caches = [w.cache for w in sim.workers if w.cache is not None]
    totals: dict[str, int] = {}
    leaders: dict[str, int] = {}
    for c in caches:
        for k, v in c.stats().items():
            totals[k] = totals.get(k, 0) + v
        lead = c.policies[-1].describe().get("leader") if c.capacity[1] else None
        if lead is not None:
            leaders[lead] = leaders.get(lead, 0) + 1
    out: dict[str, Any] = {"cache_stats": totals}
    if leaders:
        out["eviction_leaders"] = leaders
    return out


def simulate(requests: Sequence[Request], config: SimConfig, *, progress: Callable[[int], Any] | None = None) -> Summary:
    """Run one simulation and summarise it."""
    t0 = time.perf_counter()
    sim = Simulation(requests, config, progress)
    rec = sim.run()
    s = summarize(rec, config.routing, config.eviction, wall_s=time.perf_counter() - t0, n_workers=config.workers,
                  prefill_pool=config.prefill_workers)
    s.extra.update({
        "gpu_blocks_per_worker": sim.gpu_blocks,
        "host_blocks_per_worker": sim.host_blocks,
        "rate_scale": config.rate_scale,
        "preset": config.cost.name,
        "prefill_workers": config.prefill_workers,
        **_cache_report(sim),
        "prediction": prediction_accuracy(rec, config.block_tokens, last_block=config.vllm_last_block),
    })
    if config.router_replicas > 1 or config.approximate:
        s.extra.update({"router_replicas": config.router_replicas, "replica_sync": config.replica_sync,
                        "sync_delay_s": config.sync_delay_s, "approximate": config.approximate})
    if sim.syncs:
        s.extra["sync_batches"] = sum(x.counters["batches_out"] for x in sim.syncs)
    s.records = rec  # type: ignore[attr-defined]  # per-request records (not serialised)
    return s


def prediction_accuracy(rec: Records, block_tokens: int, *, last_block: bool = False) -> dict[str, float]:
    """How well the router's predicted cached prefix matched the engine's actual hit (in blocks).

    With ``last_block`` (the simulator's ``vllm_last_block``) a prediction of the whole prompt is compared
    as one block less, the rule the engine's hit follows (as the proxy compares with vLLM's report).

    ``exact``: fraction of routed requests whose prediction equals the hit; ``over``/``under``: fraction
    predicted above/below it; ``mae_blocks``: mean absolute error; ``predicted_blocks``/``hit_blocks``:
    totals.  The approximate mode's accuracy against the simulator's truth (docs/replicas.md).
    """
    import numpy as np

    done = rec.worker >= 0
    if not done.any():
        return {}
    pred = np.ceil(rec.predicted_cached[done] / block_tokens).astype(np.int64)
    n = rec.blocks[done]
    pred = np.minimum(pred, n)
    if last_block:
        pred = np.where((pred >= n) & (n > 0), n - 1, pred)
    hit = (rec.gpu_hit + rec.host_hit)[done]
    diff = pred - hit
    return {"exact": float((diff == 0).mean()), "over": float((diff > 0).mean()), "under": float((diff < 0).mean()),
            "mae_blocks": float(np.abs(diff).mean()), "predicted_blocks": int(pred.sum()), "hit_blocks": int(hit.sum())}
