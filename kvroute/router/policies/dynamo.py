"""``dynamo``: NVIDIA Dynamo's default KV-router cost (ai-dynamo 1.6.x), reproduced.

Design notes (BRIEF section 4; Dynamo's ``kv_router`` scheduler)::

    credit_w = gpu_w + host_credit * host_w + disk_credit * disk_w          (blocks)
    logit_w  = prefill_load_scale * max(0, (active_prefill_tokens_w + isl) / block_size - credit_w)
               + decode_blocks_w + active_requests_weight * active_requests_w

Lowest logit wins; ties are broken at random (seeded here).  With
``temperature > 0`` the worker is sampled instead, with probability
proportional to ``exp(-l / temperature)`` over min-max normalised logits ``l``,
as Dynamo's softmax sampler does.  Dynamo with KV events matches against its
radix tree only, so this policy ignores speculative (pending) blocks
(``uses_pending = False``); ``active_prefill_tokens`` and ``decode_blocks`` are
the loads Dynamo's own sequence tracker keeps from the requests it routed,
which is what the router tracks too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..policy import Policy, argmin_tiebreak, costs_dict
from ..types import Candidate, Choice, FleetView, RouteRequest


@dataclass(frozen=True)
class DynamoWeights:
    """Dynamo's knobs, at its defaults."""

    #: ``overlap_score_weight`` / prefill load scale: weight of the prefill-block term.
    prefill_load_scale: float = 1.0
    #: Credit of a block cached on host memory, relative to a GPU block.
    host_credit: float = 0.75
    #: Credit of a block cached on disk.
    disk_credit: float = 0.25
    #: Weight of the active-request count (0 in Dynamo's default).
    active_requests_weight: float = 0.0
    #: Softmax sampling temperature; 0 = deterministic argmin.
    temperature: float = 0.0


def score(req: RouteRequest, c: Candidate, w: DynamoWeights) -> float:
    """Dynamo's logit for one worker (pure; lower is better)."""
    s = c.state
    credit = c.gpu + w.host_credit * c.host + w.disk_credit * c.disk
    prefill_blocks = max(0.0, (s.prefill_tokens + req.num_tokens) / req.block_size - credit)
    return w.prefill_load_scale * prefill_blocks + s.decode_blocks + w.active_requests_weight * s.active_requests


class DynamoPolicy(Policy):
    name = "dynamo"
    Weights = DynamoWeights
    uses_pending = False

    def choose(self, req: RouteRequest, fleet: FleetView) -> Choice:
        w: DynamoWeights = self.weights
        cands = fleet.candidates
        logits = [score(req, c, w) for c in cands]
        if w.temperature > 0 and len(cands) > 1:
            lo, hi = min(logits), max(logits)
            span = hi - lo
            norm = [(x - lo) / span if span > 0 else 0.0 for x in logits]
            weights = [math.exp(-x / w.temperature) for x in norm]
            pick = fleet.rng.choices(cands, weights=weights, k=1)[0]
            return Choice(pick.worker, costs_dict(cands, logits), "softmax sample")
        pick = argmin_tiebreak(cands, logits, fleet.rng)
        return Choice(pick.worker, costs_dict(cands, logits), "min logit")
