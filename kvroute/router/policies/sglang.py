"""``sglang``: SGLang router's ``cache_aware`` policy, reproduced with its known flaw.

Design notes (BRIEF section 4; sglang-router ``cache_aware``):

1. Load = requests in flight per worker.  The system is *imbalanced* when
   ``max_load - min_load > balance_abs_threshold`` and
   ``max_load > min_load * balance_rel_threshold`` (defaults 64, 1.5): then the
   least-loaded worker is chosen.
2. Otherwise, with ``match_rate = matched_tokens / input_tokens``: if
   ``match_rate > cache_threshold`` (0.3) the deepest-matching worker is chosen;
   else the least-loaded one.

Ties go to the first worker in registration order (Rust's ``min_by_key`` keeps
the first minimum).  That is the flaw users report: when loads are equal --
e.g. every request of a light load finished -- every miss goes to the first
worker.  We reproduce it faithfully; ``kvroute`` breaks such ties by fair share.

Deviations: SGLang matches characters in an approximate tree filled only by
the requests it routed; we match token blocks in the exact index united with
the speculative (routed, not yet confirmed) blocks, which is at least as well
informed.  "Costs" reported in a decision are the load (load branches) or the
negated matched blocks (cache branch).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..policy import Policy, costs_dict
from ..types import Candidate, Choice, FleetView, RouteRequest


@dataclass(frozen=True)
class SGLangWeights:
    """SGLang router's thresholds, at their defaults."""

    #: Minimum matched share of the prompt to route by cache.
    cache_threshold: float = 0.3
    #: Absolute load gap beyond which the system counts as imbalanced.
    balance_abs_threshold: int = 64
    #: Relative load ratio beyond which the system counts as imbalanced.
    balance_rel_threshold: float = 1.5


def load(c: Candidate) -> int:
    """SGLang's load: requests in flight (router-tracked, or the worker's report if larger)."""
    return c.state.queue_requests()


def score(req: RouteRequest, c: Candidate, w: SGLangWeights) -> float:
    """Matched share of the prompt on this worker (pure; higher is better in the cache branch)."""
    return (c.total * req.block_size) / req.num_tokens if req.num_tokens else 0.0


def _first_min(cands: list[Candidate], key) -> Candidate:
    return min(cands, key=lambda c: (key(c), c.state.order))


class SGLangPolicy(Policy):
    name = "sglang"
    Weights = SGLangWeights
    uses_pending = True

    def choose(self, req: RouteRequest, fleet: FleetView) -> Choice:
        w: SGLangWeights = self.weights
        cands = fleet.candidates
        loads = [load(c) for c in cands]
        hi, lo = max(loads), min(loads)
        if hi - lo > w.balance_abs_threshold and hi > lo * w.balance_rel_threshold:
            pick = _first_min(cands, load)
            return Choice(pick.worker, costs_dict(cands, loads), "imbalanced: least loaded")
        best = _first_min(cands, lambda c: -c.total)
        if score(req, best, w) > w.cache_threshold:
            return Choice(best.worker, costs_dict(cands, [-c.total for c in cands]), "cache: deepest match")
        pick = _first_min(cands, load)
        return Choice(pick.worker, costs_dict(cands, loads), "miss: least loaded (first on ties)")
