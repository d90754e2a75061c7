"""``preble``: Preble's exploit/explore rule (Srivatsa et al., ICLR'25), reproduced.

Design notes (BRIEF section 4; Preble's E2 scheduling):

* **Exploit** when the best-matching worker has more cached prompt tokens than
  new ones (``cached > num_tokens - cached``): route to the longest match
  (ties: lowest windowed load, then first registered).
* **Explore** otherwise: route to ``argmin load_w + evict_w + prefill_w`` where
  ``load_w`` is the estimated GPU time (uncached prefill + a per-request decode
  estimate) of requests routed to the worker over the last ``window_s`` seconds (Preble's history window, 3 minutes), ``evict_w`` the
  prefill time of the blocks the new prompt would push out of a full cache
  (when the worker's capacity is known), and ``prefill_w`` the new request's
  uncached prefill time there.
* **Hot-prefix replication**: when exploiting would put the request on a worker
  whose windowed load exceeds ``replicate_ratio`` times the mean (Preble
  replicates a prefix when its TTFT doubles), it explores instead.

Deviation: Preble measures load as GPU time of its own batches; we estimate
it from prompt tokens with the same per-token prefill constant as ``kvroute``.
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

    #: History window of the load term, seconds.
    window_s: float = 180.0
    #: Replicate (explore) when the exploit target's load exceeds this times the mean load.
    replicate_ratio: float = 2.0
    #: Seconds of prefill per prompt token (same default as kvroute's).
    prefill_s_per_token: float = 3.2e-5
    #: GPU seconds a request's decode adds to its worker's windowed load (Preble measures it; we estimate).
    decode_s_per_request: float = 0.1


def score(req: RouteRequest, c: Candidate, w: PrebleWeights, *, window_load_s: float) -> float:
    """Preble's explore cost of one worker: load + eviction + prefill (pure; lower is better)."""
    t = w.prefill_s_per_token
    new_blocks = max(0, req.num_blocks - c.total)
    prefill = max(0, req.num_tokens - c.total * req.block_size) * t
    evict = 0.0
    cap = c.state.capacity_blocks
    if cap:
        over = c.state.decode_blocks + new_blocks - cap
        if over > 0:
            evict = over * req.block_size * t
    return window_load_s + evict + prefill


class PreblePolicy(Policy):
    name = "preble"
    Weights = PrebleWeights
    uses_pending = True

    def __init__(self, weights: Any = None) -> None:
        super().__init__(weights)
        #: (time, worker, prefill seconds) of decisions inside the window, oldest first.
        self._history: deque[tuple[float, Any, float]] = deque()
        #: {worker: summed prefill seconds inside the window}.
        self._load: dict[Any, float] = {}

    def _expire(self, now: float) -> None:
        h, cut = self._history, now - self.weights.window_s
        while h and h[0][0] < cut:
            _, wid, s = h.popleft()
            v = self._load.get(wid, 0.0) - s
            if wid in self._load:
                self._load[wid] = v if v > 1e-12 else 0.0

    def window_load(self, worker: Any) -> float:
        return self._load.get(worker, 0.0)

    def choose(self, req: RouteRequest, fleet: FleetView) -> Choice:
        w: PrebleWeights = self.weights
        self._expire(fleet.now)
        cands = fleet.candidates
        loads = [self._load.get(c.worker, 0.0) for c in cands]
        best_total = max(c.total for c in cands)
        cached = best_total * req.block_size
        if best_total > 0 and cached > req.num_tokens - cached:
            tops = [(ld, c.state.order, c) for c, ld in zip(cands, loads) if c.total == best_total]
            ld, _, top = min(tops, key=lambda x: (x[0], x[1]))
            mean = sum(loads) / len(loads)
            if not (mean > 0 and ld > w.replicate_ratio * mean):
                return Choice(top.worker, costs_dict(cands, [-c.total for c in cands]), "exploit: longest match")
            reason = "explore: hot prefix replicated"
        else:
            reason = "explore: min load + evict + prefill"
        costs = [score(req, c, w, window_load_s=ld) for c, ld in zip(cands, loads)]
        pick = argmin_tiebreak(cands, costs, fleet.rng)
        return Choice(pick.worker, costs_dict(cands, costs), reason)

    def on_routed(self, req: RouteRequest, fleet: FleetView, chosen: Candidate) -> None:
        w = self.weights
        s = max(0, req.num_tokens - chosen.total * req.block_size) * w.prefill_s_per_token + w.decode_s_per_request
        self._history.append((fleet.now, chosen.worker, s))
        self._load[chosen.worker] = self._load.get(chosen.worker, 0.0) + s

    def forget_worker(self, worker: Any) -> None:
        # drop its history too: a worker re-added under the same id starts from zero load,
        # and must not have its new load cancelled when the old entries leave the window
        self._load.pop(worker, None)
        self._history = deque(e for e in self._history if e[1] != worker)
