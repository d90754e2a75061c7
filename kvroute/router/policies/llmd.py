"""``llmd``: llm-d's inference scheduler with weighted scorers, reproduced.

Source reproduced: llm-d ``llm-d-inference-scheduler`` as of its v0.4 line --
the sample ``precise-prefix-cache-routing`` EndpointPickerConfig
(``guides/precise-prefix-cache-aware/...``: ``precise-prefix-cache-scorer``
weight 2, ``kv-cache-utilization-scorer`` 1, ``queue-scorer`` 1) and the
scorers of gateway-api-inference-extension ``pkg/epp/scheduling/framework/
plugins/scorer/queue.go`` (min-max normalised ``WaitingQueueSize``) and
``kvcache_utilization.go`` (``1 - KVCacheUsagePercent``); llm-d-kv-cache's
``kvcache/kvblock`` tier weights (GPU 1.0, CPU 0.8).

The score of a worker is a weighted sum of scorers, each in [0, 1]; the
highest score wins (ties at random, seeded here)::

    prefix_w = (gpu_tier * (gpu_w [+ pending_w]) + cpu_tier * host_w + disk_tier * disk_w) / prompt_blocks
    kv_w     = 1 - kv_usage_w                      (0 usage when unknown)
    queue_w  = (max_q - q_w) / (max_q - min_q)     (1 for every worker when all queues are equal)
    score_w  = prefix_weight * prefix_w + kv_weight * kv_w + queue_weight * queue_w

``q_w`` is the worker's *waiting* queue (its reported ``num_requests_waiting``;
the router's count of requests not yet through prefill when the worker has not
reported).  Speculative indexing (llm-d's 2 s speculative entries between a
decision and the engine's event) is off by default in llm-d, so pending
blocks count only with ``speculative=True``.

Named variant ``llmd_v0`` keeps what this module ran before: the older guide's
weights 3:2:2, a queue of all in-flight requests (waiting + running, or the
router's in-flight count when larger) and speculative entries on.
``disk_tier`` is our choice (llm-d documents GPU and CPU only).  Decisions
report ``-score`` as cost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..policy import Policy, argmin_tiebreak, costs_dict
from ..types import Candidate, Choice, FleetView, RouteRequest


@dataclass(frozen=True)
class LLMDWeights:
    """Scorer weights of llm-d's precise-prefix profile (current sample config)."""

    #: Weight of the precise prefix-cache scorer.
    prefix_weight: float = 2.0
    #: Weight of the KV-cache-utilisation scorer.
    kv_weight: float = 1.0
    #: Weight of the queue scorer.
    queue_weight: float = 1.0
    #: Weight of a block cached on GPU (or pending there) inside the prefix scorer.
    gpu_tier: float = 1.0
    #: Weight of a block cached in host (CPU) memory inside the prefix scorer.
    cpu_tier: float = 0.8
    #: Weight of a block cached on disk inside the prefix scorer (our choice; llm-d documents GPU and CPU).
    disk_tier: float = 0.5
    #: Queue scorer input: False = the waiting queue (llm-d); True = every request in flight (``llmd_v0``).
    queue_in_flight: bool = False
    #: Speculative indexing: count blocks a recent decision put on the worker (off by default in llm-d).
    speculative: bool = False


def queue_length(c: Candidate, w: LLMDWeights) -> int:
    """The queue the scorer normalises: waiting requests (reported, else router-counted), or all in flight."""
    s = c.state
    if w.queue_in_flight:
        return s.queue_requests()
    return s.reported_waiting if s.reported_waiting is not None else s.prefill_requests


def score(req: RouteRequest, c: Candidate, w: LLMDWeights, *, min_q: int, max_q: int) -> float:
    """llm-d's weighted score of one worker (pure; higher is better)."""
    nb = req.num_blocks
    gpu = c.gpu + c.pending if w.speculative else c.gpu
    prefix = ((w.gpu_tier * gpu + w.cpu_tier * c.host + w.disk_tier * c.disk) / nb) if nb else 0.0
    u = c.state.kv_usage()
    kv = 1.0 - (u if u is not None else 0.0)
    q = queue_length(c, w)
    queue = 1.0 if max_q == min_q else (max_q - q) / (max_q - min_q)
    return w.prefix_weight * prefix + w.kv_weight * kv + w.queue_weight * queue


class LLMDPolicy(Policy):
    name = "llmd"
    Weights = LLMDWeights
    uses_pending = False

    def __init__(self, weights: Any = None) -> None:
        super().__init__(weights)
        #: Per instance: the router matches speculative blocks only when this profile indexes speculatively.
        self.uses_pending = bool(self.weights.speculative)

    def choose(self, req: RouteRequest, fleet: FleetView) -> Choice:
        w: LLMDWeights = self.weights
        cands = fleet.candidates
        qs = [queue_length(c, w) for c in cands]
        lo, hi = min(qs), max(qs)
        neg = [-score(req, c, w, min_q=lo, max_q=hi) for c in cands]
        pick = argmin_tiebreak(cands, neg, fleet.rng)
        return Choice(pick.worker, costs_dict(cands, neg), "max weighted score")


@dataclass(frozen=True)
class LLMDv0Weights(LLMDWeights):
    """What ``llmd`` ran before this module followed the current llm-d sources: weights 3:2:2,
    in-flight queue, speculative entries on."""

    prefix_weight: float = 3.0
    kv_weight: float = 2.0
    queue_weight: float = 2.0
    queue_in_flight: bool = True
    speculative: bool = True


class LLMDv0Policy(LLMDPolicy):
    """Named variant ``llmd_v0`` (module docstring)."""

    name = "llmd_v0"
    Weights = LLMDv0Weights
