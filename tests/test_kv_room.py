"""The wait-for-KV-room term of the kvroute cost model and its Little's-law hold time.

An engine starts a prompt only when the GPU has room for its blocks beside
those of the requests in flight; the cost model prices that wait as
``H * min(1, over / active)`` (kvroute/router/policies/kvroute_cost.py), with
``H`` the mean time a request stays routed and unfinished, from the router's
own counts (kvroute/router/policies/hold_time.py).
"""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.router import Router
from kvroute.router.policies.hold_time import HoldTime
from kvroute.router.policies.kvroute_cost import KVRouteWeights, kv_room_wait
from kvroute.router.types import Role, WorkerState

W = KVRouteWeights()


def _state(active_blocks: int, capacity: int | None = 100, active_requests: int = 1) -> WorkerState:
    s = WorkerState("w", 0, Role.BOTH, capacity)
    s.active_blocks = active_blocks
    s.active_requests = active_requests
    return s


def test_no_wait_while_the_prompt_fits():
    assert kv_room_wait(40, _state(60), 0, W, 10.0) == 0.0
    assert kv_room_wait(40, _state(0), 0, W, 10.0) == 0.0  # nothing in flight: nothing to wait for
    assert kv_room_wait(40, _state(90, capacity=None), 0, W, 10.0) == 0.0  # capacity unknown
    assert kv_room_wait(40, _state(90), 0, W, 0.0) == 0.0  # no hold time measured yet


def test_wait_is_the_share_of_active_blocks_to_free_times_the_hold_time():
    # 80 active + 40 new - 100 capacity = 20 blocks over: a quarter of the 80 active must leave
    assert kv_room_wait(40, _state(80), 0, W, 10.0) == pytest.approx(10.0 * 20 / 80)
    # blocks the new prompt shares with requests in flight need no new room
    assert kv_room_wait(40, _state(80), 30, W, 10.0) == 0.0
    # never more than the hold time (by then the requests in flight have been replaced)
    assert kv_room_wait(500, _state(80), 0, W, 10.0) == 10.0
    assert kv_room_wait(40, _state(80), 0, KVRouteWeights(kv_room=False), 10.0) == 0.0


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 300), st.integers(1, 300), st.integers(0, 300), st.integers(1, 400))
def test_wait_grows_with_the_worker_s_active_blocks(nb, act, overlap, cap):
    """More KV in use on a worker never makes waiting there cheaper (no reward for loading a worker)."""
    a = kv_room_wait(nb, _state(act, cap), overlap, W, 7.0)
    b = kv_room_wait(nb, _state(act + 1, cap), overlap, W, 7.0)
    assert 0.0 <= a <= b <= 7.0


def test_hold_time_is_littles_law_from_the_start():
    """Steady arrivals, 2 per second, each held 15 s: 30 in flight; H = 30 / 2 = 15 s, bias-corrected from
    the first windows on (an uncorrected exponential average would start near 0 and report ~window/elapsed
    times too long)."""
    h = HoldTime(300.0)
    assert h.update(0.0, 0, 0) == 0.0
    routed = 0
    for k in range(1, 121):  # one observation per arrival, for 60 s
        routed += 1
        est = h.update(0.5 * k, routed, 30)
    assert est == pytest.approx(15.0, rel=0.02)


def test_hold_time_ignores_a_shrinking_count_and_a_clock_going_back():
    h = HoldTime(10.0)
    h.update(0.0, 100, 5)
    e1 = h.update(1.0, 110, 5)
    assert e1 > 0
    e2 = h.update(0.5, 50, 5)  # a worker left the pool (its count with it); the clock stepped back
    assert math.isfinite(e2) and e2 > 0
    with pytest.raises(ValueError):
        HoldTime(0.0)


def _two_workers(weights: KVRouteWeights) -> Router:
    """w0 holds 90 of its 100 GPU blocks for a request in flight (decoding) and has the first 20 blocks of the
    coming prompt cached (not in use); w1 holds 10 blocks in flight and nothing of the prompt."""
    t = [0.0]
    r = Router(["w0", "w1"], 4, pending_ttl_s=0, capacity_blocks=100, clock=lambda: t[0], weights=weights)
    for rid, (w, blocks) in enumerate((("w0", 90), ("w1", 10))):
        other = "w1" if w == "w0" else "w0"
        r.mark_unhealthy(other)
        d = r.route_hashes(list(range(1000 * (rid + 1), 1000 * (rid + 1) + blocks)), num_tokens=4 * blocks,
                           request_id=rid)
        assert d.worker == w
        r.prefill_done(rid)
        r.mark_healthy(other)
        t[0] += 1.0
    r.index.store("w0", list(range(50_000, 50_020)))
    return r


def test_router_sends_a_long_prompt_where_it_fits():
    """The 40-block prompt would wait on w0 for 30 blocks to be freed (its 20 cached blocks are not in use:
    they need room too); without the room term the cache keeps it on w0."""
    prompt = list(range(50_000, 50_040))
    on = _two_workers(KVRouteWeights())
    assert on.route_hashes(prompt, num_tokens=160, request_id="long").worker == "w1"
    off = _two_workers(KVRouteWeights(kv_room=False))
    assert off._active is None
    assert off.route_hashes(prompt, num_tokens=160, request_id="long").worker == "w0"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.one_of(st.none(), st.integers(1, 300)), st.integers(0, 300)),
                min_size=1, max_size=8),
       st.integers(0, 200))
def test_room_waits_none_exactly_when_every_wait_is_zero(workers, nb):
    """``room_waits`` skips workers that cannot lack room and answers None when no wait is positive: the
    same costs as the full per-candidate list (adding nothing = adding 0.0)."""
    from kvroute.router.policies.kvroute_cost import KVRoutePolicy

    pol = KVRoutePolicy(KVRouteWeights())
    states = []
    for act, cap, _ in workers:
        s = _state(act, cap, active_requests=3)
        s.routed_total = 50
        states.append(s)
    overlaps = [min(o, nb) for _, _, o in workers]
    pol.room_waits(nb, states, overlaps, 0.0)  # two decisions 10 s apart, so that the hold time is measured
    for s in states:
        s.routed_total += 10
    got = pol.room_waits(nb, states, overlaps, 10.0)
    hold = pol.hold.update(10.0, sum(s.routed_total for s in states), sum(s.active_requests for s in states))
    full = [kv_room_wait(nb, s, o, pol.weights, hold) for s, o in zip(states, overlaps)]
    if got is None:
        assert all(x == 0.0 for x in full)
    else:
        assert got == full


def test_room_waits_lists_positive_waits():
    """The non-None side of the property above, with a measured hold time."""
    from kvroute.router.policies.kvroute_cost import KVRoutePolicy

    pol = KVRoutePolicy(KVRouteWeights())
    a, b = _state(90), _state(10)
    assert pol.room_waits(50, [a, b], [0, 0], 0.0) == [0.0, 0.0]  # no hold time measured yet: no wait
    a.routed_total = b.routed_total = 10
    got = pol.room_waits(50, [a, b], [0, 0], 10.0)
    assert got is not None and got[0] > 0.0 and got[1] == 0.0
