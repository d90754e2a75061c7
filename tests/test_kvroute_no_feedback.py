"""kvroute's policy has no feedback that makes a loaded worker stickier.

The case from issue 15: 30 unfinished requests piled on one worker that holds
an 8,192-token prompt; a new request that shares only its first 512 of 8,704
tokens must go elsewhere.  Before, the fleet term's ``busy`` was a mean over
all candidates, which the hot worker's own pile inflated: more load on it
raised the price of leaving it.  The property: adding in-flight requests to a
best-cached worker never turns a decision that avoided it into one that
picks it.
"""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.router import Router
from kvroute.router.policies.kvroute_cost import KVRoutePolicy
from kvroute.router.types import Candidate, FleetView, Role, RouteRequest, WorkerState


def test_piled_hot_worker_does_not_keep_a_mostly_new_request():
    bs = 512
    r = Router([f"w{i}" for i in range(8)], bs, pending_ttl_s=0)
    doc = list(range(1, 17))  # 16 blocks = 8,192 tokens
    r.index.store("w0", doc)
    for i in range(1, 8):
        r.mark_unhealthy(f"w{i}")
    for i in range(30):  # 30 requests for the same prompt, fully cached, piled on w0 (queued for prefill)
        assert r.route_hashes(doc, num_tokens=8192, request_id=f"pile{i}").worker == "w0"
    for i in range(1, 8):
        r.mark_healthy(f"w{i}")
    new = doc[:1] + list(range(100, 116))  # shares 512 of 8,704 tokens
    d = r.route_hashes(new, num_tokens=8704, request_id="new")
    assert d.worker != "w0", d


def _state(i: int, prefill_tokens: int, prefill_requests: int, decode_blocks: int) -> WorkerState:
    s = WorkerState(f"w{i}", i, Role.BOTH)
    s.prefill_tokens = prefill_tokens
    s.prefill_requests = prefill_requests
    s.active_requests = prefill_requests
    s.routed_total = prefill_requests
    s.decode_blocks = decode_blocks
    return s


worker = st.tuples(st.integers(0, 20_000), st.integers(0, 12), st.integers(0, 400), st.integers(0, 40))


@settings(max_examples=400, deadline=None)
@given(
    workers=st.lists(worker, min_size=2, max_size=6),
    hot_total=st.integers(1, 40),
    adds=st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 40)), min_size=1, max_size=30),
    nb=st.integers(1, 48),
    seed=st.integers(0, 2**16),
)
def test_load_on_the_best_cached_worker_never_makes_it_stickier(workers, hot_total, adds, nb, seed):
    bs = 64
    req = RouteRequest("q", nb * bs, nb, bs)
    hot_total = min(hot_total, nb)

    def decide(extra):
        states = [_state(i, *w[:3]) for i, w in enumerate(workers)]
        h = states[0]
        for tokens, blocks in extra:
            h.prefill_tokens += tokens
            h.prefill_requests += 1
            h.active_requests += 1
            h.routed_total += 1
            h.decode_blocks += blocks
        cands = [Candidate(states[0], hot_total, hot_total)]
        for s, w in zip(states[1:], workers[1:]):
            t = min(w[3], hot_total)  # the others hold at most what the hot worker holds
            cands.append(Candidate(s, t, t))
        return KVRoutePolicy().choose(req, FleetView(cands, random.Random(seed), 0.0)).worker

    before = decide([])
    if before == "w0":
        return
    for k in range(1, len(adds) + 1):
        assert decide(adds[:k]) != "w0", (before, adds[:k])
