"""Replica sync, transport-free: ReplicaSync between routers with hand-delivered batches (injected clocks)."""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from kvroute.router import ApproxPrefixes, Router
from kvroute.sync import ReplicaSync
from kvroute.sync import messages as m

WORKERS = ["w0", "w1", "w2"]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def replica(name: str, clock: Clock, **kw) -> tuple[Router, ReplicaSync]:
    r = Router(WORKERS, 4, clock=clock, request_ttl_s=kw.pop("request_ttl_s", 60.0), policy=kw.pop("policy", "kvroute"))
    return r, ReplicaSync(r, name, clock=clock, incarnation="i", **kw)


def pump(*syncs: ReplicaSync, drop: set[int] | None = None) -> list[bytes]:
    """Deliver every queued batch of every replica to every other one (in order); returns what was sent."""
    sent = []
    moved = True
    while moved:
        moved = False
        for s in syncs:
            while s.has_output():
                b = s.take_batch()
                sent.append(b)
                moved = True
                if drop and len(sent) - 1 in drop:
                    continue
                for o in syncs:
                    if o is not s:
                        o.receive(b)
    return sent


def load(r: Router) -> dict[str, tuple[int, int, int, int]]:
    return {w: (s.prefill_tokens, s.prefill_requests, s.decode_blocks, s.active_requests)
            for w in WORKERS for s in [r.worker_state(w)]}


def truth(*routers: Router) -> dict[str, tuple[int, ...]]:
    """What every replica must see: the sum of each replica's own (local) load."""
    out = {w: [0, 0, 0, 0] for w in WORKERS}
    for r in routers:
        for f in r.local_flights():
            v = out[f.worker]
            if f.prefill_open:
                v[0] += f.prefill_tokens
                v[1] += 1
            v[2] += f.blocks
            v[3] += 1
    return {w: tuple(v) for w, v in out.items()}


def prompt(seed: int, n: int = 32) -> list[int]:
    return [(seed * 7919 + i) % 50_000 for i in range(n)]


def test_route_prefill_finish_propagate():
    c = Clock()
    (ra, sa), (rb, sb) = replica("a", c), replica("b", c)
    d = ra.route(prompt(1), request_id="x")
    pump(sa, sb)
    assert load(rb) == load(ra) == truth(ra, rb)
    assert rb.worker_state(d.worker).active_requests == 1
    ra.prefill_done("x")
    pump(sa, sb)
    assert load(rb) == truth(ra, rb)
    ra.finish("x")
    pump(sa, sb)
    assert load(rb) == load(ra) == truth(ra, rb)
    assert rb.stats()["remote_in_flight"] == 0


def test_speculative_prefix_shared():
    c = Clock()
    (ra, sa), (rb, sb) = replica("a", c), replica("b", c)
    # A long prompt: the speculative prefix must outweigh the first request's load on its worker
    # (kvroute's policy no longer prefers a loaded worker for a short shared prefix).
    d = ra.route(prompt(2, 1024), request_id="x")
    pump(sa, sb)
    d2 = rb.route(prompt(2, 1024), request_id="y")
    assert d2.worker == d.worker and d2.predicted_pending_tokens == 64 * 16


def test_duplicate_batches_never_double_count():
    c = Clock()
    (ra, sa), (rb, sb) = replica("a", c), replica("b", c)
    ra.route(prompt(3), request_id="x")
    b = sa.take_batch()
    for _ in range(3):
        sb.receive(b)
    assert load(rb) == truth(ra, rb)
    assert sb.counters["duplicate_batches"] == 2


def test_malformed_batches_and_ops_are_counted_not_fatal():
    c = Clock()
    (ra, sa), (rb, sb) = replica("a", c), replica("b", c)
    before = load(rb)
    for junk in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"v": 2}), msgpack.packb({"v": 1, "o": "z", "n": 0, "ops": []}),
                 None, "text", b"\x00" * 100):
        sb.receive(junk)
    assert sb.counters["malformed_batches"] == 8
    good = [m.ROUTE, "ok", "w1", None, 10, 3, 30.0, b"", 0]
    bad = [[m.ROUTE, "bad", "w1"], [m.ROUTE, "neg", "w1", None, -1, 3, 30.0, b"", 0], ["zz"], [], "x",
           [m.ROUTE, "h", "w1", None, 1, 1, 30.0, b"\x01\x02", 1], [m.ROUTE, "nan", "w1", None, 1, 1, float("nan"), b"", 0],
           [m.ROUTE, "ghost", "w9", None, 1, 1, 30.0, b"", 0], [m.STATE, "no"], [m.APPROX, "w1", [[-1, 2.0]]]]
    sb.receive(m.encode_batch("z/1", 1, bad + [good]))
    assert sb.counters["malformed_ops"] == 9 and sb.counters["unknown_workers"] == 1
    after = load(rb)
    assert after["w1"] == (before["w1"][0] + 10, before["w1"][1] + 1, before["w1"][2] + 3, before["w1"][3] + 1)
    sb.receive(m.encode_batch("z/1", 2, [[m.FINISH, "never-routed"], [m.FINISH, "ok"], [m.FINISH, "ok"]]))
    assert load(rb) == before and sb.counters["unknown_releases"] == 2


def test_gap_triggers_state_query_and_converges():
    c = Clock()
    (ra, sa), (rb, sb) = replica("a", c), replica("b", c)
    ra.route(prompt(4), request_id="x")
    pump(sa, sb)
    ra.route(prompt(5), request_id="y")
    ra.finish("x")
    sa.take_batch()  # lost on the way
    ra.route(prompt(6), request_id="z")
    pump(sa, sb)  # b sees a gap, asks a for its state, a answers
    assert sb.counters["gaps"] == 1 and sb.counters["states_applied"] == 1
    assert load(rb) == load(ra) == truth(ra, rb)


def test_silent_peer_released_after_lease():
    c = Clock()
    (ra, sa), (rb, sb) = replica("a", c, lease_s=3.0), replica("b", c, lease_s=3.0)
    for i in range(5):
        ra.route(prompt(10 + i), request_id=i)
    pump(sa, sb)
    assert rb.stats()["remote_in_flight"] == 5
    c.t += 2.0
    assert sb.tick() == 0
    c.t += 1.5  # "a" was SIGKILLed: no heartbeat for 3.5 s
    assert sb.tick() == 5
    assert load(rb) == truth(rb) and "a/i" not in sb.peers


def test_heartbeat_keeps_peer_alive():
    c = Clock()
    (ra, sa), (rb, sb) = replica("a", c, lease_s=3.0, heartbeat_s=1.0), replica("b", c, lease_s=3.0, heartbeat_s=1.0)
    ra.route(prompt(20), request_id="x")
    pump(sa, sb)
    for _ in range(10):
        c.t += 1.0
        b = sa.take_batch()
        assert b is not None  # a heartbeat is due every second
        sb.receive(b)
        assert sb.tick() == 0
    assert rb.stats()["remote_in_flight"] == 1


def test_remote_request_deadline():
    c = Clock()
    (ra, sa), (rb, sb) = replica("a", c, request_ttl_s=5.0), replica("b", c, request_ttl_s=5.0)
    ra.route(prompt(30), request_id="x")
    pump(sa, sb)
    c.t += 5.5
    rb.route(prompt(31), request_id="y")  # routing expires remote flights past their deadline
    assert rb.stats()["remote_in_flight"] == 0 and rb.expired_remote == 1


def test_state_from_restarted_replica_catches_up():
    c = Clock()
    (ra, sa), (rb, sb) = replica("a", c), replica("b", c)
    for i in range(4):
        ra.route(prompt(40 + i), request_id=i)
    ra.prefill_done(1)
    pump(sa, sb)
    # a new replica joins late: it asks everyone for their state
    rc, sc = replica("c", c)
    sc.queue_query(approx=True)
    pump(sa, sb, sc)
    assert load(rc) == load(ra) == load(rb) == truth(ra, rb, rc)


def test_dp_and_disaggregated_workers_round_trip():
    c = Clock()
    ra = Router([("e", 0), ("e", 1)], 4, clock=c, decode_workers=[("d", 0)], request_ttl_s=60.0)
    rb = Router([("e", 0), ("e", 1)], 4, clock=c, decode_workers=[("d", 0)], request_ttl_s=60.0)
    sa, sb = ReplicaSync(ra, "a", clock=c), ReplicaSync(rb, "b", clock=c)
    d = ra.route(prompt(50), request_id="x")
    pump(sa, sb)
    assert rb.worker_state(("d", 0)).decode_blocks == 8
    assert rb.worker_state(d.worker).prefill_requests == 1
    ra.finish("x")
    pump(sa, sb)
    assert rb.worker_state(("d", 0)).decode_blocks == 0


# ----------------------------------------------------------------- approximate mode
def test_approximate_mode_predicts_from_decisions_with_ttl():
    c = Clock()
    r = Router(WORKERS, 4, clock=c, approx_ttl_s=10.0, pending_ttl_s=0.5)
    for w in WORKERS:
        r.set_approximate(w)
    d = r.route(prompt(60), request_id="x")
    r.finish("x")
    c.t += 5.0  # pending entries are gone; the approximate ones remain
    d2 = r.route(prompt(60), request_id="y")
    assert d2.worker == d.worker and d2.predicted_cached_tokens == 32 and d2.predicted_pending_tokens == 0
    r.finish("y")
    c.t += 10.5
    d3 = r.route(prompt(60), request_id="z")
    assert d3.predicted_cached_tokens == 0
    r.set_approximate(d.worker, False)
    assert r.stats()["approx_entries"] == 0 or d.worker not in r.approximate_workers()


def test_approximate_entries_shared_across_replicas():
    c = Clock()
    (ra, sa), (rb, sb) = replica("a", c), replica("b", c)
    for r in (ra, rb):
        for w in WORKERS:
            r.set_approximate(w)
    d = ra.route(prompt(70), request_id="x")
    ra.finish("x")
    pump(sa, sb)
    c.t += 10.0  # pending generations long gone
    d2 = rb.route(prompt(70), request_id="y")
    assert d2.worker == d.worker and d2.predicted_cached_tokens == 32
    # a late joiner copies the approximate entries
    rc, sc = replica("c", c)
    for w in WORKERS:
        rc.set_approximate(w)
    sc.queue_query(approx=True)
    pump(sa, sb, sc)
    # asked about that worker alone (the policy may spread a prefix it has seen twice: hot-prefix relief)
    others = [w for w in WORKERS if w != d.worker]
    assert rc.route(prompt(70), request_id="z", exclude=others).predicted_cached_tokens == 32


def test_approx_capacity_bound_evicts_least_recent():
    a = ApproxPrefixes(100.0)
    a.add(0, [1, 2, 3], 0.0, capacity=4)
    a.add(0, [9, 8], 1.0, capacity=4)  # 1 goes (least recently routed)
    a.check_invariants()
    assert a.entries(0) == 4 and a.match([1, 2, 3], 2.0) == {}
    assert a.match([9, 8, 7], 2.0) == {0: 2}
    a.add(0, [2, 3, 4], 3.0, capacity=4)  # refreshes 2 and 3; 4 pushes out 9 (now the oldest)
    assert a.match([9, 8], 3.0) == {}  # 8 remains but its parent is gone: no match
    a.check_invariants()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(0, 6), min_size=1, max_size=4),
                          st.floats(0, 3)), max_size=30), st.integers(1, 6))
def test_approx_against_reference(steps, cap):
    """ApproxPrefixes vs a dict-per-slot reference: LRU order, capacity, TTL, matching depth."""
    ttl = 5.0
    a = ApproxPrefixes(ttl)
    ref: dict[int, dict[int, float]] = {0: {}, 1: {}, 2: {}}
    now = 0.0
    for slot, hs, dt in steps:
        now += dt
        chain = [h for i, h in enumerate(hs) if h not in hs[:i]]
        a.add(slot, chain, now, capacity=cap)
        d = ref[slot]
        for s in ref.values():  # expire
            for h in [h for h, e in s.items() if e <= now]:
                del s[h]
        for h in chain:
            d.pop(h, None)
            d[h] = now + ttl
        while len(d) > cap:
            del d[next(iter(d))]
        a.check_invariants()
        q = chain + [99]
        want = {}
        for s, dd in ref.items():
            k = 0
            while k < len(q) and q[k] in dd and dd[q[k]] > now:
                k += 1
            if k:
                want[s] = k
        assert a.match(q, now) == want
