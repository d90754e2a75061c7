"""Decode-worker choice for disaggregated prefill/decode pools.

Design notes: with separate pools (Mooncake FAST'25, Dynamo, llm-d), the
prefill worker is chosen by the routing policy (prefix overlap + compute
load); the decode worker holds the KV for the whole generation, so it is
chosen by free KV capacity and decode load, never by cache overlap (the KV
arrives by transfer).  Cost of decode worker ``w`` for a prompt of ``nb``
blocks::

    frac_w = (decode_blocks_w + nb) / capacity_w        (capacity unknown: / max_v(decode_blocks_v + nb))
    cost_w = capacity_weight * frac_w
             + load_weight * active_w / max(1, max_v active_v)
             + overflow_penalty * [frac_w > 1]

Lowest cost wins; ties by fair share, then seeded random.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from .policy import argmin_tiebreak, costs_dict, fair_share_key
from .types import Candidate, WorkerState


@dataclass(frozen=True)
class DecodeWeights:
    """Knobs of the decode-worker choice."""

    #: Weight of the KV fill fraction after admitting the request.
    capacity_weight: float = 1.0
    #: Weight of the (normalised) number of requests decoding.
    load_weight: float = 1.0
    #: Added when the prompt would not fit in the worker's free KV (known capacity only).
    overflow_penalty: float = 10.0


def decode_score(num_blocks: int, s: WorkerState, w: DecodeWeights, *, max_blocks: int, max_active: int) -> float:
    """Cost of decoding a prompt of ``num_blocks`` on worker ``s`` (pure; lower is better)."""
    after = s.decode_blocks + num_blocks
    cap = s.capacity_blocks if s.capacity_blocks else max(1, max_blocks)
    frac = after / cap
    cost = w.capacity_weight * frac + w.load_weight * s.active_requests / max(1, max_active)
    if s.capacity_blocks and frac > 1.0:
        cost += w.overflow_penalty
    return cost


def choose_decode(num_blocks: int, pool: Sequence[WorkerState], w: DecodeWeights,
                  rng: random.Random) -> tuple[WorkerState, dict[Any, float]]:
    """The decode worker for a prompt, and every candidate's cost."""
    max_blocks = max(s.decode_blocks for s in pool) + num_blocks
    max_active = max(s.active_requests for s in pool)
    cands = [Candidate(s) for s in pool]
    costs = [decode_score(num_blocks, s, w, max_blocks=max_blocks, max_active=max_active) for s in pool]
    pick = argmin_tiebreak(cands, costs, rng, secondary=fair_share_key)
    return pick.state, costs_dict(cands, costs)
