"""``dynamo``: NVIDIA Dynamo's default KV-router selection, as ai-dynamo-runtime 1.6.1 runs it.

Source reproduced: ai-dynamo-runtime 1.6.1 (PyPI), crate ``dynamo-kv-router``:
``lib/kv-router/src/scheduling/selector/default.rs`` (``DefaultWorkerScorer::
worker_logit`` and ``minimum_cost_index``), the load inputs of
``scheduling/selector/mod.rs`` (``raw_prefill_blocks``, ``decode_cost_blocks =
potential_decode_blocks``) and the active-sequence tracker under
``lib/kv-router/src/sequences/`` (``router_assume_kv_reuse``, on by default).
``tests/test_dynamo_differential.py`` drives the real selection service of that
wheel (``dynamo._core.SelectionService``) and checks the picks.

Formula, per worker ``w`` (blocks of ``bs`` tokens; ``isl`` = prompt tokens,
``nb = isl // bs`` full blocks)::

    credit_w   = device_w + host_credit * host_w + disk_credit * disk_w
    prefill_w  = prefill_load_scale * max(0, (active_prefill_tokens_w + isl) / bs - credit_w)
    decode_w   = active_blocks_w + (nb - active_overlap_w)          assume_kv_reuse (default)
               = decode_blocks_w + nb                               otherwise
    logit_w    = prefill_w + decode_w + active_requests_weight * active_requests_w

* ``active_prefill_tokens`` is what Dynamo booked for requests whose prefill
  is not complete: for each, ``isl - bs * credit`` at its decision (so 25% of
  a host hit and 75% of a disk hit stay booked as prefill load):
  :meth:`DynamoPolicy.booked_prefill_tokens`.
* ``active_blocks`` counts the prompt blocks of a worker's unfinished requests
  once each (requests sharing a prefix share its KV); ``active_overlap`` is how
  many leading blocks of the new prompt are among them.  Partial last blocks are
  not counted.  With ``assume_kv_reuse=False`` every request's blocks count.
* Tiers: Dynamo measures the device prefix, then the host extension, then the
  disk extension.  kvroute's index gives each block of the matched prefix its
  fastest tier; the two agree whenever no faster-tier block follows a
  slower-only one in the chain (how engines lay tiers out: a prefix's tail is
  evicted first).  Interleaved layouts are a listed deviation (docs/routing.md).

Lowest logit wins; ties (exact float equality, as Dynamo compares) go to a
uniformly random tied worker (seeded here; Dynamo uses reservoir sampling).
With ``temperature > 0`` the worker is sampled with probability proportional to
``exp(-(l - min) / ((max - min) * temperature))``, Dynamo's softmax sampler.
Dynamo with KV events matches against its radix tree only, so this policy
ignores speculative (pending) blocks (``uses_pending = False``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..policy import Policy, costs_dict
from ..types import Candidate, Choice, FleetView, RouteRequest


@dataclass(frozen=True)
class DynamoWeights:
    """Dynamo's knobs (``KvRouterConfig``), at the 1.6.1 defaults."""

    #: ``prefill_load_scale`` (alias ``overlap_score_weight``): weight of the prefill-block term.
    prefill_load_scale: float = 1.0
    #: ``overlap_score_credit``: credit of a block cached on the device.
    device_credit: float = 1.0
    #: ``host_cache_hit_weight``: credit of a block cached in host memory.
    host_credit: float = 0.75
    #: ``disk_cache_hit_weight``: credit of a block cached on disk.
    disk_credit: float = 0.25
    #: ``decode_active_request_weight``: block-equivalents per active request (0 by default).
    active_requests_weight: float = 0.0
    #: ``router_temperature``: softmax sampling temperature; 0 = deterministic argmin.
    temperature: float = 0.0
    #: ``router_assume_kv_reuse``: count shared active blocks once and add only the new prompt's blocks
    #: not yet active on the worker.  False: every in-flight prompt's blocks plus all the new ones.
    assume_kv_reuse: bool = True


def credit_blocks(c: Candidate, w: DynamoWeights) -> float:
    """Cache credit of a candidate in blocks (device + weighted host and disk hits)."""
    return w.device_credit * c.gpu + w.host_credit * c.host + w.disk_credit * c.disk


def decode_blocks(req: RouteRequest, c: Candidate, w: DynamoWeights) -> int:
    """Dynamo's ``potential_decode_blocks`` of the worker if ``req`` went there."""
    s = c.state
    if w.assume_kv_reuse:
        return s.active_blocks + req.num_blocks - min(c.active, req.num_blocks)
    return s.decode_blocks + req.num_blocks


def score(req: RouteRequest, c: Candidate, w: DynamoWeights) -> float:
    """Dynamo's logit for one worker (pure; lower is better)."""
    s = c.state
    prefill = max(0.0, (s.prefill_tokens + req.num_tokens) / req.block_size - credit_blocks(c, w))
    return (w.prefill_load_scale * prefill + decode_blocks(req, c, w)
            + w.active_requests_weight * s.active_requests)


class DynamoPolicy(Policy):
    name = "dynamo"
    Weights = DynamoWeights
    uses_pending = False
    tracks_active_blocks = True

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
        best = min(logits)
        tied = [c for c, v in zip(cands, logits) if v == best]
        pick = tied[0] if len(tied) == 1 else tied[fleet.rng.randrange(len(tied))]
        return Choice(pick.worker, costs_dict(cands, logits), "min logit")

    def booked_prefill_tokens(self, req: RouteRequest, chosen: Candidate) -> int:
        """Dynamo books ``isl - bs * credit`` tokens of prefill (host/disk hits only partly credited)."""
        booked = req.num_tokens - req.block_size * credit_blocks(chosen, self.weights)
        return max(0, int(round(booked)))
