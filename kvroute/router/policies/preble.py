"""``preble``: Preble's E2 global scheduler (Srivatsa et al., ICLR'25), reproduced from its code.

Source reproduced: WukLab/preble, ``multi_node/global_scheduler_with_time.py``
(``GlobalSchedulerWithTime.runtime_selector``, ``get_recomp_cost``,
``handle_important_node_stealing``) and ``multi_node/histogram.py``
(``SlidingWindowHistogram``: per-prefix hit counts and per-GPU cost over a
3-minute window).

* **Exploit** when the longest cached match is larger than the rest of the
  prompt (``cached > num_tokens - cached``): go to the worker holding it
  (ties: lowest windowed cost, then seeded random).
* **Explore** otherwise: ``argmin load_w + evict_w + prefill_w`` where

  - ``load_w``: the GPU time of the requests routed to the worker inside the
    window, each prefix's prefill counted at its *miss rate* (a prefix routed
    ``k`` times that missed ``m`` of them counts ``m / k`` of its prefill per
    request: the uncached part each request had), plus their decode work
    (``expected_output_tokens`` steps over the request's context);
  - ``evict_w``: the recomputation, weighted by popularity, of what the
    worker's cache would have to give up for the new blocks when it is full
    (window hits of the evicted blocks times their prefill time; the router
    does not see the engine's LRU order, so the blocks given up are charged at
    the mean window popularity of the worker's routed blocks);
  - ``prefill_w``: the new request's uncached prefill time there.
* **Rebalancing** (``handle_important_node_stealing``): once the busiest worker
  has ``rebalance_min_requests`` (50) requests in the window and its windowed
  cost is at least ``rebalance_ratio`` (1.5) times the lightest's, a request
  the exploit rule would send to the busiest goes to the lightest instead (the
  prefix moves there).
* Preble's per-GPU fair queue (prefix-grouped priorities inside each engine's
  waiting queue) is engine-side scheduling, not routing: not reproduced.

Named variant ``preble_v0`` keeps what this module ran before: a fixed decode
estimate of 0.1 s per request, no eviction popularity and the TTFT-doubling
replication rule instead of Preble's rebalancing.
Deviation: Preble measures GPU time with fitted per-model equations; we use
kvroute's per-token constants (calibrated from the simulator's cost model).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from ..policy import Policy, argmin_tiebreak, costs_dict
from ..types import Candidate, Choice, FleetView, RouteRequest


@dataclass(frozen=True)
class PrebleWeights:
    """Preble's knobs."""

    #: History window of the load term, seconds (Preble: 3 minutes).
    window_s: float = 180.0
    #: Seconds of prefill per prompt token (same default as kvroute's).
    prefill_s_per_token: float = 3.2e-5
    #: Seconds of decode pressure per context token per output step (KV read; as kvroute's decode constant).
    decode_s_per_token: float = 4.0e-8
    #: Seconds of one decode step's fixed part (weights read) shared by a batch: per request per output token.
    decode_step_s: float = 2.5e-4
    #: Output tokens expected per request (Preble estimates from the history; the router sees no outputs).
    expected_output_tokens: int = 256
    #: Rebalance once the busiest worker has this many requests in the window.
    rebalance_min_requests: int = 50
    #: ... and its windowed cost is at least this times the lightest's.
    rebalance_ratio: float = 1.5
    #: ``preble_v0``: fixed per-request decode seconds (0 = Preble's decode work model).
    fixed_decode_s: float = 0.0
    #: ``preble_v0``: replicate (explore) when the exploit target's load exceeds this times the mean; 0 = off.
    replicate_ratio: float = 0.0


def decode_work(req: RouteRequest, w: PrebleWeights) -> float:
    """GPU seconds a request's decode adds to its worker's windowed cost."""
    if w.fixed_decode_s:
        return w.fixed_decode_s
    return w.expected_output_tokens * (w.decode_step_s + req.num_tokens * w.decode_s_per_token)


def score(req: RouteRequest, c: Candidate, w: PrebleWeights, *, window_load_s: float,
          popularity: float = 1.0) -> float:
    """Preble's explore cost of one worker: windowed load + eviction + prefill (pure; lower is better)."""
    t = w.prefill_s_per_token
    new_blocks = max(0, req.num_blocks - c.total)
    prefill = max(0, req.num_tokens - c.total * req.block_size) * t
    evict = 0.0
    cap = c.state.capacity_blocks
    if cap:
        over = c.state.decode_blocks + new_blocks - cap
        if over > 0:
            evict = popularity * over * req.block_size * t
    return window_load_s + evict + prefill


class PreblePolicy(Policy):
    name = "preble"
    Weights = PrebleWeights
    uses_pending = True

    def __init__(self, weights: Any = None) -> None:
        super().__init__(weights)
        #: (time, worker, cost seconds, blocks routed, hits) of decisions inside the window, oldest first.
        self._history: deque[tuple[float, Any, float, int, int]] = deque()
        #: {worker: summed cost seconds inside the window}.
        self._load: dict[Any, float] = {}
        #: {worker: requests inside the window}.
        self._count: dict[Any, int] = {}
        #: {worker: [blocks routed, block hits] inside the window} (popularity of its blocks).
        self._blocks: dict[Any, list[int]] = {}

    def _expire(self, now: float) -> None:
        h, cut = self._history, now - self.weights.window_s
        while h and h[0][0] < cut:
            _, wid, s, nb, hits = h.popleft()
            if wid in self._load:
                v = self._load[wid] - s
                self._load[wid] = v if v > 1e-12 else 0.0
                self._count[wid] -= 1
                b = self._blocks[wid]
                b[0] -= nb
                b[1] -= hits

    def window_load(self, worker: Any) -> float:
        return self._load.get(worker, 0.0)

    def _popularity(self, worker: Any) -> float:
        """Mean window uses of a block routed to the worker (1 + hits per block routed)."""
        b = self._blocks.get(worker)
        return 1.0 + (b[1] / b[0] if b and b[0] > 0 else 0.0)

    def choose(self, req: RouteRequest, fleet: FleetView) -> Choice:
        w: PrebleWeights = self.weights
        self._expire(fleet.now)
        cands = fleet.candidates
        loads = [self._load.get(c.worker, 0.0) for c in cands]
        best_total = max(c.total for c in cands)
        cached = best_total * req.block_size
        if best_total > 0 and cached > req.num_tokens - cached:
            tops = [c for c in cands if c.total == best_total]
            tl = [self._load.get(c.worker, 0.0) for c in tops]
            top = argmin_tiebreak(tops, tl, fleet.rng)
            ld = self._load.get(top.worker, 0.0)
            reason = None
            if w.replicate_ratio:
                mean = sum(loads) / len(loads)
                if mean > 0 and ld > w.replicate_ratio * mean:
                    reason = "explore: hot prefix replicated"
            else:
                lo_i = min(range(len(cands)), key=lambda i: loads[i])
                hi = max(loads)
                if (ld == hi and self._count.get(top.worker, 0) >= w.rebalance_min_requests
                        and ld >= w.rebalance_ratio * loads[lo_i] and cands[lo_i] is not top):
                    light = [c for c, x in zip(cands, loads) if x == loads[lo_i]]
                    pick = light[0] if len(light) == 1 else light[fleet.rng.randrange(len(light))]
                    return Choice(pick.worker, costs_dict(cands, loads), "rebalance: prefix moved to lightest")
            if reason is None:
                return Choice(top.worker, costs_dict(cands, [-c.total for c in cands]), "exploit: longest match")
        else:
            reason = "explore: min load + evict + prefill"
        costs = [score(req, c, w, window_load_s=ld, popularity=self._popularity(c.worker))
                 for c, ld in zip(cands, loads)]
        pick = argmin_tiebreak(cands, costs, fleet.rng)
        return Choice(pick.worker, costs_dict(cands, costs), reason)

    def on_routed(self, req: RouteRequest, fleet: FleetView, chosen: Candidate) -> None:
        w = self.weights
        s = max(0, req.num_tokens - chosen.total * req.block_size) * w.prefill_s_per_token + decode_work(req, w)
        hits = min(chosen.total, req.num_blocks)
        self._history.append((fleet.now, chosen.worker, s, req.num_blocks, hits))
        wid = chosen.worker
        self._load[wid] = self._load.get(wid, 0.0) + s
        self._count[wid] = self._count.get(wid, 0) + 1
        b = self._blocks.setdefault(wid, [0, 0])
        b[0] += req.num_blocks
        b[1] += hits

    def forget_worker(self, worker: Any) -> None:
        # drop its history too: a worker re-added under the same id starts from zero load,
        # and must not have its new load cancelled when the old entries leave the window
        self._load.pop(worker, None)
        self._count.pop(worker, None)
        self._blocks.pop(worker, None)
        self._history = deque(e for e in self._history if e[1] != worker)


@dataclass(frozen=True)
class Preblev0Weights(PrebleWeights):
    """``preble_v0``: what this module ran before (fixed 0.1 s decode, TTFT-doubling replication)."""

    fixed_decode_s: float = 0.1
    replicate_ratio: float = 2.0


class Preblev0Policy(PreblePolicy):
    """Named variant ``preble_v0`` (module docstring)."""

    name = "preble_v0"
    Weights = Preblev0Weights
