"""``sglang``: SGLang router's ``cache_aware`` policy, reproduced with its known flaw.

Design notes (BRIEF section 4; sgl-router ``policies/cache_aware.rs``):

1. Load = the router's own count of requests in flight per worker (its
   ``running_queue``).  The system is *imbalanced* when ``max_load - min_load >
   balance_abs_threshold`` and ``max_load > min_load * balance_rel_threshold``
   (defaults 64, 1.5): then the least-loaded worker is chosen.
2. Otherwise, with ``match_rate = matched / input``: if ``match_rate >
   cache_threshold`` (0.3) the deepest-matching worker is chosen; else the
   worker with the *smallest tree* (``get_smallest_tenant``: fewest characters
   inserted by the requests routed to it).

Source reproduced: sgl-router (``sglang-router`` 0.2.x line),
``sgl-router/src/policies/cache_aware.rs`` (``select_worker``) and
``src/tree.rs`` (``prefix_match_tenant``, ``get_smallest_tenant``).

Ties: the real router keeps its tenants (workers) in a ``DashMap`` and scans
it for the smallest tree and for the deepest match, so which tied worker wins
depends on the hash map's iteration order -- arbitrary, not the first
registered.  Ties go to a seeded random tied worker here.  The named variant
``sglang_first`` keeps what this module ran before: ties to the first
registered worker, which piles every miss on one worker whenever the trees
tie (the flaw reported against older releases that scanned a ``Vec``).

Deviations: SGLang matches characters in an approximate tree filled only by
the requests it routed; we match token blocks in the exact index united with
the speculative (routed, not yet confirmed) blocks, which is at least as well
informed.  Tree size is counted in tokens: each routed prompt adds the tokens
beyond the chosen worker's match (what SGLang's insert adds for that tenant);
SGLang's size-triggered LRU eviction of its tree (millions of characters) is
not modelled.  "Costs" reported in a decision are the load (imbalanced
branch), the negated matched blocks (cache branch) or the tree size (miss
branch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    #: Ties to the first registered worker (``sglang_first``) instead of an arbitrary (seeded random) one.
    ties_first_registered: bool = False


def load(c: Candidate) -> int:
    """SGLang's load: the router's own count of requests in flight on the worker."""
    return c.state.active_requests


def score(req: RouteRequest, c: Candidate, w: SGLangWeights) -> float:
    """Matched share of the prompt on this worker (pure; higher is better in the cache branch)."""
    return (c.total * req.block_size) / req.num_tokens if req.num_tokens else 0.0


def _min_of(cands: list[Candidate], key, fleet: FleetView, first: bool) -> Candidate:
    """The candidate with the lowest ``key``; ties to the first registered, or to a seeded random one."""
    if first:
        return min(cands, key=lambda c: (key(c), c.state.order))
    keys = [key(c) for c in cands]
    lo = min(keys)
    tied = [c for c, k in zip(cands, keys) if k == lo]
    return tied[0] if len(tied) == 1 else tied[fleet.rng.randrange(len(tied))]


class SGLangPolicy(Policy):
    name = "sglang"
    Weights = SGLangWeights
    uses_pending = True

    def __init__(self, weights: Any = None) -> None:
        super().__init__(weights)
        #: {worker: tokens its approximate tree holds} (grows with each request routed to it).
        self._tree: dict[Any, int] = {}

    def tree_size(self, worker: Any) -> int:
        return self._tree.get(worker, 0)

    def choose(self, req: RouteRequest, fleet: FleetView) -> Choice:
        w: SGLangWeights = self.weights
        cands = fleet.candidates
        loads = [load(c) for c in cands]
        hi, lo = max(loads), min(loads)
        if hi - lo > w.balance_abs_threshold and hi > lo * w.balance_rel_threshold:
            pick = _min_of(cands, load, fleet, w.ties_first_registered)
            return Choice(pick.worker, costs_dict(cands, loads), "imbalanced: least loaded")
        best = _min_of(cands, lambda c: -c.total, fleet, w.ties_first_registered)
        if score(req, best, w) > w.cache_threshold:
            return Choice(best.worker, costs_dict(cands, [-c.total for c in cands]), "cache: deepest match")
        sizes = [self._tree.get(c.worker, 0) for c in cands]
        pick = _min_of(cands, lambda c: self._tree.get(c.worker, 0), fleet, w.ties_first_registered)
        return Choice(pick.worker, costs_dict(cands, sizes), "miss: smallest tree")

    def on_routed(self, req: RouteRequest, fleet: FleetView, chosen: Candidate) -> None:
        new = max(0, req.num_tokens - chosen.total * req.block_size)
        self._tree[chosen.worker] = self._tree.get(chosen.worker, 0) + new

    def forget_worker(self, worker: Any) -> None:
        self._tree.pop(worker, None)


@dataclass(frozen=True)
class SGLangFirstWeights(SGLangWeights):
    """``sglang_first``: ties to the first registered worker."""

    ties_first_registered: bool = True


class SGLangFirstPolicy(SGLangPolicy):
    """Named variant ``sglang_first`` (module docstring)."""

    name = "sglang_first"
    Weights = SGLangFirstWeights
