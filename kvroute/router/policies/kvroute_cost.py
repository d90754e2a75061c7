"""``kvroute``: our policy -- an explicit time-to-first-token cost model that sees the fleet.

Design notes
------------
Per-request greedy rules (Dynamo's default logit, BRIEF section 4) price only
the request being routed.  On a busy fleet that scatters a burst sharing a
prefix: each copy is "a little faster" on an emptier worker, and every worker
then pays to recompute the same prefix, which delays everyone queued behind it.
Preble (ICLR'25) and Mooncake (FAST'25) price load, prefill and the cache
together; this model does the same, in seconds, with constants from public
specs (BRIEF section 6), and adds the fleet's recomputation cost explicitly.

Formula (all times in seconds; ``bs`` = block size; overlaps in blocks, the
pending part counts as GPU)::

    queue_w   = max(inflight_prefill_tokens_w, floor * queued_requests_w, reported_queue_tokens_w) * t_prefill
    prefill_w = max(0, N - bs * total_w) * t_prefill
    reload_w  = bs * host_w * t_host + bs * disk_w * t_disk
    decode_w  = decode_weight * bs * decode_blocks_w * t_decode
    kv_w      = kv_weight * max(0, (u_w - kv_high) / (1 - kv_high)) * prefill_w
    ttft_w    = queue_w + prefill_w + reload_w + decode_w + kv_w

    busy      = clip(mean queued requests over {v : total_v < max total}, fleet_pressure_floor, fleet_pressure_cap)
    fleet_w   = fleet_weight * busy * bs * (max_v total_v - total_w) * t_prefill
    over_w    = active_w + (nb - active_overlap_w) - capacity_w
    room_w    = H * min(1, over_w / active_w)      if kv_room and over_w > 0, else 0
    cost_w    = ttft_w + fleet_w + room_w

``room_w`` is the wait for KV room.  An engine (vLLM's scheduler, and the
simulator's workers) starts a prompt only when the GPU has room for its blocks
beside those the requests in flight hold; otherwise it waits, with everything
queued behind it, until running requests finish.  ``active_w`` is the number of
*distinct* prompt blocks of the requests routed to ``w`` and not finished (the
router's active-block table, shared prefixes counted once, queued requests
included: they take their room first), ``active_overlap_w`` how many leading
blocks of the new prompt are among them, ``capacity_w`` the worker's GPU blocks
and ``nb`` the prompt's full blocks.  When ``over_w > 0`` blocks must be freed
first.  The router's active blocks leave at the rate ``active_w / H``, where
``H`` is the mean time a request stays routed and unfinished, known by
Little's law from the router's own counts (:mod:`.hold_time`: requests in
flight over the decision rate); so ``over_w`` blocks are free after about
``H * over_w / active_w`` seconds (at most ``H``: by then the requests in
flight have been replaced).  With prompts of tens of thousands of tokens (agentic
coding sessions: ~1,200 of a worker's 6,664 64-token blocks on average) this wait,
not prefill compute, is what delays a request; the prefill terms do not see it.
It is added to the cost, not to ``ttft`` (hot-prefix relief compares compute
only).  It has no multiplier to tune: it is the modelled wait in seconds, on
the same footing as the prefill terms (docs/routing.md gives its sensitivity).
``kv_room=False`` turns it off, and the router then keeps no active-block
table.

``busy`` is the fleet's pressure: the mean number of requests queued for
prefill per candidate *that would do the recomputation* -- every candidate
holding less than the best-cached one (router count, worker report, or 1 when
only queued tokens are reported) -- at least ``fleet_pressure_floor`` and at
most ``fleet_pressure_cap``.  The best-cached workers are left out on purpose:
with them in, load piled on the hot worker raised ``busy`` and so the price of
leaving it, making a loaded worker stickier (30 fully cached requests queued on
one worker kept pulling a request that shared 512 of its 8,704 tokens;
``tests/test_kvroute_no_feedback.py``).  The floor says a recomputation is never
free, even on an idle fleet: the GPU time a copy takes is not there for the
next arrival (without it, a burst of siblings scattered over idle workers
while the first copy was still in prefill).  On a busy fleet ``busy`` grows
with the backlog: the recomputation costs someone's TTFT, and on an overloaded
fleet delays every request queued behind it.  ``floor``
(``queued_request_floor_tokens``) is the least prefill, in tokens, a queued
request costs even when fully cached (vLLM still runs it through a forward
pass for its last token): a pile of cached requests is not free.  Both floors
were chosen by cross-validation (docs/routing.md, "Defaults chosen on some
families").  ``u_w`` is the worker's KV usage (reported, else decode blocks /
capacity); near a full cache the engine preempts and recomputes.
``reported_queue_tokens`` is the worker's report of queued prompt tokens, else
its waiting requests times ``reported_request_tokens``; the larger of it and
the router's own count is used, so the two never double count.

Replication rule: a request leaves the best-cached worker, and so copies the
prefix to another one, exactly when ``cost`` says so -- when the best-cached
worker's extra queueing exceeds the recomputation elsewhere plus the fleet's
price for it (reason ``"replicate: load outweighs cache"``).  Hot-prefix
relief bounds the wait on top of that: let ``b`` be the candidate with the most
cached blocks (ties: lowest ``ttft``).  If ``ttft_b > relief_ratio *
min_w ttft_w`` the fleet term is waived and the request goes to the
lowest-``ttft`` worker, which then computes (replicates) the prefix; the reason
says ``"replicate: hot-prefix relief"``.  This is Preble's "replicate a hot
prefix when its TTFT doubles" with ``relief_ratio = 2``.

Otherwise the lowest ``cost`` wins; ties go to the worker holding more of the
prompt (it saves a recomputation), then the fewest requests in flight, then the
fewest ever routed (so distinct cold prompts spread evenly: no worker gets more
than its fair share), then seeded random.

Router replicas (:func:`blind_spread`): a replica whose peers' decisions reach
it a sync delay late has a view short of about ``unseen`` decisions (measured
by replica sync, ``FleetView.unseen``).  Costs within ``min(unseen, 1)`` times
this request's own queueing (``max(N - bs * total_pick, floor) * t_prefill``)
of the lowest are then ties, drawn uniformly with the replica's seeded rng, so
simultaneous requests on several replicas do not all take the one least-cost
worker.  One router has ``unseen = 0`` and decides as above.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..policy import Policy, argmin_tiebreak, costs_dict


def cached_then_fair_share(c: Candidate) -> tuple[int, int, int]:
    """Tie-break: the worker holding (or computing) more of the prompt, then fewest in flight, then fewest routed.

    On an exact cost tie the cached worker saves the fleet a recomputation (a burst of siblings whose
    first copy is still in prefill ties "wait for it" against "compute it again elsewhere"); cold
    prompts, cached nowhere, still spread by fair share.
    """
    s = c.state
    return (-c.total, s.active_requests, s.routed_total)
from ..types import Candidate, Choice, FleetView, RouteRequest, WorkerState
from .hold_time import HoldTime


@dataclass(frozen=True)
class KVRouteWeights:
    """Constants of the cost model.  Defaults: Llama-3.1-8B on one H100 (BRIEF section 6)."""

    #: Seconds of prefill compute per prompt token: 16 GFLOP / 989 TFLOP/s at ~50% utilisation.
    prefill_s_per_token: float = 3.2e-5
    #: Seconds to reload one token's KV from host memory: 128 KiB / 55 GB/s (PCIe Gen5).
    host_reload_s_per_token: float = 2.4e-6
    #: Seconds to reload one token's KV from local disk: 128 KiB / ~7 GB/s (NVMe).
    disk_reload_s_per_token: float = 1.9e-5
    #: Seconds of decode pressure per active KV token: 128 KiB / 3.35 TB/s read each step.
    decode_s_per_token: float = 4.0e-8
    #: Multiplier of the decode-pressure term.
    decode_weight: float = 1.0
    #: Prompt tokens assumed per reported waiting request when the worker reports no token count.
    reported_request_tokens: int = 1024
    #: Multiplier of the fleet recomputation term (0 = per-request greedy TTFT).  Above 1 because a
    #: recomputed block is paid in GPU time now and again in the cache room its copy takes from
    #: other prefixes; 1.5 was the best of 1 / 1.5 / 2 on both bundled traces at 1-3x their rate.
    fleet_weight: float = 1.5
    #: Cap of the fleet pressure ``busy`` (mean requests queued for prefill per worker).
    fleet_pressure_cap: float = 16.0
    #: Floor of ``busy``: recomputing a prefix on an idle worker is never quite free (the GPU time it takes
    #: is not there for the next arrival; a burst of siblings scattered over idle workers recomputes its
    #: prompt on each).  0 = free on an idle fleet.
    fleet_pressure_floor: float = 1.0
    #: Hot-prefix relief: replicate when the best-cached worker's TTFT exceeds this times the best TTFT.
    relief_ratio: float = 2.0
    #: Least prefill, in tokens, that each request queued for prefill costs even when fully cached (it still
    #: takes a forward pass): a pile of cached requests delays the next one.  Cross-validated (docs/routing.md).
    queued_request_floor_tokens: float = 128.0
    #: KV usage above which the preemption-risk term starts.
    kv_high: float = 0.9
    #: Multiplier of the preemption-risk term.
    kv_weight: float = 1.0
    #: Price the wait for KV room (``room_w``; False: off, and the router keeps no active-block table).
    kv_room: bool = True
    #: Averaging window, seconds, of the decision rate in the Little's-law hold time ``H`` (:mod:`.hold_time`).
    #: Chosen on the choice families (rag, siblings; seed-averaged): docs/routing.md.
    hold_window_s: float = 60.0


def queue_tokens(c: Candidate, w: KVRouteWeights) -> float:
    """Prompt tokens queued for prefill ahead of this request on the candidate (at least the floor per request)."""
    s = c.state
    rep = s.reported_queue_tokens
    if rep is None and s.reported_waiting is not None:
        rep = s.reported_waiting * w.reported_request_tokens
    return max(s.prefill_tokens, w.queued_request_floor_tokens * s.prefill_requests, rep or 0)


def ttft(req: RouteRequest, c: Candidate, w: KVRouteWeights) -> float:
    """Estimated time to first token of ``req`` on candidate ``c`` (pure)."""
    bs = req.block_size
    t = w.prefill_s_per_token
    prefill = max(0, req.num_tokens - bs * c.total) * t
    cost = queue_tokens(c, w) * t + prefill
    cost += bs * (c.host * w.host_reload_s_per_token + c.disk * w.disk_reload_s_per_token)
    cost += w.decode_weight * bs * c.state.decode_blocks * w.decode_s_per_token
    u = c.state.kv_usage()
    if u is not None and u > w.kv_high and w.kv_weight:
        cost += w.kv_weight * min(1.0, (u - w.kv_high) / max(1e-9, 1.0 - w.kv_high)) * prefill
    return cost


def fleet_cost(req: RouteRequest, c: Candidate, w: KVRouteWeights, *, best_total: int, busy: float) -> float:
    """Recomputation the fleet pays if ``c`` is chosen over the best-cached worker, weighted by busyness."""
    return w.fleet_weight * busy * req.block_size * max(0, best_total - c.total) * w.prefill_s_per_token


def score(req: RouteRequest, c: Candidate, w: KVRouteWeights, *, best_total: int = 0, busy: float = 0.0,
          hold_s: float = 0.0) -> float:
    """The full cost ``ttft + fleet + room`` (pure; see the module docstring)."""
    return (ttft(req, c, w) + fleet_cost(req, c, w, best_total=best_total, busy=busy)
            + kv_room_wait(req.num_blocks, c.state, c.active, w, hold_s))


def may_lack_room(state: WorkerState, num_blocks: int) -> bool:
    """Whether ``num_blocks`` new blocks could overflow the worker's KV room beside its active blocks: only
    then can :func:`kv_room_wait` be positive, whatever the prompt's overlap with them."""
    cap = state.capacity_blocks
    act = state.active_blocks
    return bool(cap and act and act + num_blocks > cap)


def kv_room_wait(num_blocks: int, state: WorkerState, active_overlap: int, w: KVRouteWeights, hold_s: float) -> float:
    """Seconds ``num_blocks`` prompt blocks wait for KV room on a worker (pure; ``room_w`` of the module
    docstring): 0 while the worker's distinct active blocks plus the new ones fit its capacity."""
    cap = state.capacity_blocks
    act = state.active_blocks
    if not cap or act <= 0 or hold_s <= 0.0 or not w.kv_room:
        return 0.0
    over = act + num_blocks - min(active_overlap, num_blocks) - cap
    if over <= 0:
        return 0.0
    return hold_s * min(1.0, over / act)


def queued_requests(c: Candidate, w: KVRouteWeights) -> int:
    """Requests waiting for (or in) prefill on the candidate: router count, worker report, or 1 if tokens are queued."""
    s = c.state
    n = max(s.prefill_requests, s.reported_waiting or 0)
    if n == 0 and queue_tokens(c, w) > 0:
        n = 1
    return n


def fleet_busy(cands: list[Candidate], w: KVRouteWeights) -> float:
    """Fleet pressure: mean requests queued for prefill per candidate holding less than the best-cached one
    (the best-cached are left out: their own load must not raise the price of leaving them; all of them
    when every candidate ties), capped."""
    if not cands:
        return 0.0
    best = max(c.total for c in cands)
    others = [c for c in cands if c.total < best] or cands  # all tied: the fleet term is 0 anyway
    return min(w.fleet_pressure_cap, max(w.fleet_pressure_floor, sum(queued_requests(c, w) for c in others) / len(others)))


def ttfts_fast(req: RouteRequest, cands: list[Candidate], w: KVRouteWeights) -> tuple[list[float], float, int]:
    """``[ttft(c) for c in cands]``, ``fleet_busy(cands)`` and the best overlap in one pass.

    The same arithmetic as :func:`ttft` and :func:`fleet_busy`, inlined for the
    hot path (64 workers); a test checks they agree.
    """
    bs, n = req.block_size, req.num_tokens
    t = w.prefill_s_per_token
    th, td = bs * w.host_reload_s_per_token, bs * w.disk_reload_s_per_token
    tdec = w.decode_weight * bs * w.decode_s_per_token
    rrt = w.reported_request_tokens
    kv_high, kv_weight = w.kv_high, w.kv_weight
    kv_span = max(1e-9, 1.0 - kv_high)
    floor = w.queued_request_floor_tokens
    out = []
    queued = []
    best = 0
    for c in cands:
        s = c.state
        rep = s.reported_queue_tokens
        if rep is None and s.reported_waiting is not None:
            rep = s.reported_waiting * rrt
        q = s.prefill_tokens
        if s.prefill_requests and floor * s.prefill_requests > q:
            q = floor * s.prefill_requests
        if rep and rep > q:
            q = rep
        nq = s.prefill_requests
        if s.reported_waiting and s.reported_waiting > nq:
            nq = s.reported_waiting
        queued.append(nq if nq else (1 if q > 0 else 0))
        total = c.total
        if total > best:
            best = total
        un = n - bs * total
        prefill = un * t if un > 0 else 0.0
        cost = q * t + prefill + s.decode_blocks * tdec
        if c.host or c.disk:
            cost += c.host * th + c.disk * td
        if s.reported_kv_usage is not None or s.capacity_blocks:
            u = s.kv_usage()
            if u is not None and u > kv_high and kv_weight:
                cost += kv_weight * min(1.0, (u - kv_high) / kv_span) * prefill
        out.append(cost)
    n_others = sum_others = 0
    for c, nq in zip(cands, queued):
        if c.total < best:
            n_others += 1
            sum_others += nq
    if not n_others:  # all tied (the fleet term is 0 anyway): the whole fleet's pressure
        n_others, sum_others = len(cands), sum(queued)
    busy = min(w.fleet_pressure_cap, max(w.fleet_pressure_floor, sum_others / n_others)) if n_others else 0.0
    return out, busy, best


def blind_spread(req: RouteRequest, cands: list[Candidate], costs: list[float], pick: Candidate, fleet: FleetView,
                 w: KVRouteWeights) -> Candidate:
    """A router replica's pick when other replicas decide unseen (``fleet.unseen`` > 0).

    Replicas that share their load a sync delay late decide simultaneous requests on the same view; each
    then picks the same least-cost worker and they pile there (a herd the single router never makes: it
    sees its previous decision).  What this replica cannot see is about ``fleet.unseen`` decisions, each
    adding to some worker about the queueing this request itself adds to its pick (its uncached prompt,
    at least ``queued_request_floor_tokens``, in prefill seconds).  Costs within ``min(unseen, 1)`` such
    requests of the lowest are indistinguishable from this view (one unseen request could have gone to
    any of them; a wider band, ``unseen`` requests, scattered cached prompts and measured worse), so the
    pick is drawn uniformly among them with the replica's own seeded rng (replicas' seeds differ).  One
    router (``unseen`` = 0) never comes here.
    """
    q = max(req.num_tokens - req.block_size * pick.total, w.queued_request_floor_tokens) * w.prefill_s_per_token
    top = min(costs) + min(fleet.unseen, 1.0) * q
    band = [c for c, v in zip(cands, costs) if v <= top]
    return band[fleet.rng.randrange(len(band))] if len(band) > 1 else pick


class KVRoutePolicy(Policy):
    """The fleet-aware TTFT cost model (module docstring)."""

    name = "kvroute"
    Weights = KVRouteWeights
    uses_pending = True

    def __init__(self, weights: object = None) -> None:
        super().__init__(weights)
        #: The room term needs the router's distinct active blocks (an instance attribute: per weights).
        self.tracks_active_blocks = bool(self.weights.kv_room)
        #: Little's-law hold time, updated once per decision by :meth:`room_waits` (policy-owned state).
        self.hold = HoldTime(self.weights.hold_window_s)

    def wants_active_overlap(self, num_blocks: int, states: list[WorkerState]) -> bool:
        """Only when some worker could lack room for the whole prompt (``room_w`` is 0 everywhere otherwise,
        whatever the overlaps): most decisions skip the walk."""
        return any(may_lack_room(s, num_blocks) for s in states)

    def room_waits(self, num_blocks: int, states: list[WorkerState], active: list[int], now: float) -> list[float] | None:
        """Per candidate, the wait for KV room (``room_w``), or None when it is 0 for every candidate (or the
        term is off): adding nothing and adding 0.0 give the same costs.  Called once per decision, before
        it, by :meth:`choose` and by the compiled route's caller (it updates ``hold``)."""
        w: KVRouteWeights = self.weights
        if not w.kv_room:
            return None
        routed = in_flight = 0
        short = None  # positions of workers that could lack room (room_w is 0 elsewhere, whatever the overlap)
        for i, s in enumerate(states):
            routed += s.routed_total
            in_flight += s.active_requests
            if may_lack_room(s, num_blocks):
                if short is None:
                    short = []
                short.append(i)
        hold_s = self.hold.update(now, routed, in_flight)
        if short is None:
            return None
        waits = [0.0] * len(states)
        for i in short:
            waits[i] = kv_room_wait(num_blocks, states[i], active[i], w, hold_s)
        return waits

    def choose(self, req: RouteRequest, fleet: FleetView) -> Choice:
        w: KVRouteWeights = self.weights
        cands = fleet.candidates
        ttfts, busy, best_total = ttfts_fast(req, cands, w)
        per_block = w.fleet_weight * busy * req.block_size * w.prefill_s_per_token
        room = self.room_waits(req.num_blocks, [c.state for c in cands], [c.active for c in cands], fleet.now)
        if room is None:
            costs = [t + per_block * (best_total - c.total) for c, t in zip(cands, ttfts)]
        else:
            costs = [t + per_block * (best_total - c.total) + r for c, t, r in zip(cands, ttfts, room)]
        if best_total > 0:
            # hot-prefix relief: the best-cached worker (ties: its lowest TTFT) against the best TTFT
            tb = min(t for c, t in zip(cands, ttfts) if c.total == best_total)
            tmin = min(ttfts)
            if tb > w.relief_ratio * tmin and tmin < tb:
                pick = argmin_tiebreak(cands, ttfts, fleet.rng, secondary=cached_then_fair_share)
                return Choice(pick.worker, costs_dict(cands, ttfts), "replicate: hot-prefix relief")
        pick = argmin_tiebreak(cands, costs, fleet.rng, secondary=cached_then_fair_share)
        if fleet.unseen > 0:
            pick = blind_spread(req, cands, costs, pick, fleet, w)
        if best_total == 0:
            reason = "cold: least cost (fair share on ties)"
        elif pick.total == best_total:
            reason = "min-cost: best cached"
        else:
            reason = "replicate: load outweighs cache"
        return Choice(pick.worker, costs_dict(cands, costs), reason)
