"""Replicas measure what they decide blind (``Router.view_unseen``) and kvroute spreads those decisions.

Replicas that learn each other's decisions a sync delay late decide simultaneous
requests on the same view; with one least-cost worker they all pick it (issue 13:
the conversation trace's whole-second timestamps).  ReplicaSync counts, per own
decision, the peers' decisions it had not seen; the kvroute policy then draws among
costs within one unseen request's queueing.  One router is unchanged.
"""
from __future__ import annotations

import random

from kvroute.router import Router
from kvroute.router.policies.kvroute_cost import KVRoutePolicy
from kvroute.router.types import Candidate, FleetView, Role, RouteRequest, WorkerState
from kvroute.sync import ReplicaSync

WORKERS = [f"w{i}" for i in range(4)]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _pair(clk: Clock):
    a = Router(WORKERS, 4, clock=clk, seed=1)
    b = Router(WORKERS, 4, clock=clk, seed=2)
    sa = ReplicaSync(a, "a", clock=clk, wall=clk, incarnation="i")
    sb = ReplicaSync(b, "b", clock=clk, wall=clk, incarnation="i")
    return a, b, sa, sb


def test_simultaneous_decisions_are_measured_as_unseen():
    clk = Clock()
    a, b, sa, sb = _pair(clk)
    for i in range(20):  # both replicas decide at one instant; the batches arrive 2 ms later
        a.route_hashes([100 * i + 1], num_tokens=4, request_id=f"a{i}")
        b.route_hashes([100 * i + 2], num_tokens=4, request_id=f"b{i}")
        ba, bb = sa.take_batch(), sb.take_batch()
        clk.t += 0.002
        sb.receive(ba)
        sa.receive(bb)
        clk.t += 1.0
    assert a.view_unseen > 0.5 and b.view_unseen > 0.5


def test_decisions_that_saw_each_other_are_not_unseen():
    clk = Clock()
    a, b, sa, sb = _pair(clk)
    for i in range(20):  # each batch arrives before the other replica decides
        a.route_hashes([100 * i + 1], num_tokens=4, request_id=f"a{i}")
        clk.t += 0.002
        sb.receive(sa.take_batch())
        clk.t += 0.3
        b.route_hashes([100 * i + 2], num_tokens=4, request_id=f"b{i}")
        clk.t += 0.002
        sa.receive(sb.take_batch())
        clk.t += 0.7
    assert a.view_unseen == 0.0 and b.view_unseen == 0.0


def _fleet(unseen: float, seed: int) -> tuple[RouteRequest, FleetView]:
    states = []
    for i in range(4):
        s = WorkerState(f"w{i}", i, Role.BOTH)
        s.prefill_tokens = 100 * i  # w0 cheapest, the others within one request's queueing (1,024 tokens)
        s.prefill_requests = 1 if i else 0
        states.append(s)
    req = RouteRequest("r", 1024, 256, 4)
    return req, FleetView([Candidate(s) for s in states], random.Random(seed), 0.0, unseen)


def test_one_router_keeps_the_least_cost_worker_and_replicas_spread_blind_decisions():
    p = KVRoutePolicy()
    assert {p.choose(*_fleet(0.0, seed)).worker for seed in range(30)} == {"w0"}
    blind = {p.choose(*_fleet(2.0, seed)).worker for seed in range(30)}
    assert len(blind) >= 3, blind


def test_peers_requests_count_in_the_active_block_table():
    """The wait-for-KV-room term needs every replica's requests in each replica's active-block table."""
    clk = Clock()
    a, b, sa, sb = _pair(clk)
    d = a.route_hashes(list(range(1, 41)), num_tokens=160, request_id="x")
    sb.receive(sa.take_batch())
    assert b.worker_state(d.worker).active_blocks == a.worker_state(d.worker).active_blocks == 40
    a.finish("x")
    sb.receive(sa.take_batch())
    assert b.worker_state(d.worker).active_blocks == 0


def test_peers_fully_cached_requests_count_too():
    """A prompt the index confirms whole adds no speculation, yet its blocks are active on its worker."""
    clk = Clock()
    a, b, sa, sb = _pair(clk)
    for r in (a, b):
        r.index.store("w2", list(range(1, 41)))
    d = a.route_hashes(list(range(1, 41)), num_tokens=160, request_id="y")
    assert d.worker == "w2"
    sb.receive(sa.take_batch())
    assert b.worker_state("w2").active_blocks == 40
