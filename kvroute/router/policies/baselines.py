"""Load-only baselines: ``round_robin``, ``least_loaded``, ``power_of_two``.

Design notes: the classic cache-blind balancers every KV-aware router is
compared with (vLLM production-stack and Ray Serve default to round robin;
power of two choices: Mitzenmacher 2001).  Load = requests in flight (the
router's count, or the worker's report when larger), then queued prefill
tokens.  None of them looks at the cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..policy import Policy, argmin_tiebreak, costs_dict
from ..types import Candidate, Choice, FleetView, RouteRequest


@dataclass(frozen=True)
class NoWeights:
    """These baselines have no knobs."""


def score(req: RouteRequest, c: Candidate, w: NoWeights | None = None) -> float:
    """Load of a worker: requests in flight, then prefill tokens as a fraction (pure; lower is better)."""
    return c.state.queue_requests() + c.state.prefill_tokens / (c.state.prefill_tokens + 1e6)


class RoundRobinPolicy(Policy):
    name = "round_robin"
    Weights = NoWeights
    uses_pending = False

    def __init__(self, weights: Any = None) -> None:
        super().__init__(weights)
        #: Registration order of the last worker chosen (-1: none yet).
        self._last = -1

    def choose(self, req: RouteRequest, fleet: FleetView) -> Choice:
        cands = fleet.candidates
        after = [c for c in cands if c.state.order > self._last]
        pick = after[0] if after else cands[0]
        return Choice(pick.worker, costs_dict(cands, [float(c.state.order) for c in cands]), "round robin")

    def on_routed(self, req: RouteRequest, fleet: FleetView, chosen: Candidate) -> None:
        self._last = chosen.state.order


class LeastLoadedPolicy(Policy):
    name = "least_loaded"
    Weights = NoWeights
    uses_pending = False

    def choose(self, req: RouteRequest, fleet: FleetView) -> Choice:
        cands = fleet.candidates
        costs = [score(req, c) for c in cands]
        pick = argmin_tiebreak(cands, costs, fleet.rng)
        return Choice(pick.worker, costs_dict(cands, costs), "least loaded")


class PowerOfTwoPolicy(Policy):
    name = "power_of_two"
    Weights = NoWeights
    uses_pending = False

    def choose(self, req: RouteRequest, fleet: FleetView) -> Choice:
        cands = fleet.candidates
        if len(cands) == 1:
            return Choice(cands[0].worker, {cands[0].worker: score(req, cands[0])}, "only worker")
        a, b = fleet.rng.sample(cands, 2)
        sa, sb = score(req, a), score(req, b)
        pick = a if sa <= sb else b
        return Choice(pick.worker, {a.worker: sa, b.worker: sb}, "power of two choices")
