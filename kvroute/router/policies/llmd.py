"""``llmd``: llm-d's inference scheduler with weighted scorers, reproduced.

Design notes (BRIEF section 4; llm-d ``precise-prefix-cache-aware`` guide):
the score of a worker is a weighted sum of scorers, each in [0, 1]; the
highest score wins (ties at random, seeded here)::

    prefix_w = (gpu_tier * (gpu_w + pending_w) + cpu_tier * host_w + disk_tier * disk_w) / prompt_blocks
    kv_w     = 1 - kv_usage_w                      (0 usage when unknown)
    queue_w  = (max_q - q_w) / (max_q - min_q)     (1 for every worker when all queues are equal)
    score_w  = prefix_weight * prefix_w + kv_weight * kv_w + queue_weight * queue_w

llm-d's precise prefix scorer keeps speculative entries for 2 s between a
decision and the engine's event: ``uses_pending = True`` with the router's
pending TTL.  Queue is the worker's reported waiting + running requests, or
the router's in-flight count when larger.  ``disk_tier`` is our choice (llm-d
documents GPU 1.0 and CPU 0.8 only).  Decisions report ``-score`` as cost.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..policy import Policy, argmin_tiebreak, costs_dict
from ..types import Candidate, Choice, FleetView, RouteRequest


@dataclass(frozen=True)
class LLMDWeights:
    """Scorer weights of llm-d's precise-prefix profile."""

    #: Weight of the precise prefix-cache scorer.
    prefix_weight: float = 3.0
    #: Weight of the KV-cache-utilisation scorer.
    kv_weight: float = 2.0
    #: Weight of the queue scorer.
    queue_weight: float = 2.0
    #: Weight of a block cached on GPU (or pending there) inside the prefix scorer.
    gpu_tier: float = 1.0
    #: Weight of a block cached in host (CPU) memory inside the prefix scorer.
    cpu_tier: float = 0.8
    #: Weight of a block cached on disk inside the prefix scorer (our choice; llm-d documents GPU and CPU).
    disk_tier: float = 0.5


def score(req: RouteRequest, c: Candidate, w: LLMDWeights, *, min_q: int, max_q: int) -> float:
    """llm-d's weighted score of one worker (pure; higher is better)."""
    nb = req.num_blocks
    prefix = ((w.gpu_tier * (c.gpu + c.pending) + w.cpu_tier * c.host + w.disk_tier * c.disk) / nb) if nb else 0.0
    u = c.state.kv_usage()
    kv = 1.0 - (u if u is not None else 0.0)
    q = c.state.queue_requests()
    queue = 1.0 if max_q == min_q else (max_q - q) / (max_q - min_q)
    return w.prefix_weight * prefix + w.kv_weight * kv + w.queue_weight * queue


class LLMDPolicy(Policy):
    name = "llmd"
    Weights = LLMDWeights
    uses_pending = True

    def choose(self, req: RouteRequest, fleet: FleetView) -> Choice:
        w: LLMDWeights = self.weights
        cands = fleet.candidates
        qs = [c.state.queue_requests() for c in cands]
        lo, hi = min(qs), max(qs)
        neg = [-score(req, c, w, min_q=lo, max_q=hi) for c in cands]
        pick = argmin_tiebreak(cands, neg, fleet.rng)
        return Choice(pick.worker, costs_dict(cands, neg), "max weighted score")
