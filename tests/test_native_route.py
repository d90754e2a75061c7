"""The compiled route and speculative-prefix table against the Python reference.

Differential: two routers, one on the reference index + Python policy path, one on the
compiled index + compiled route, driven through the same random fleet histories; every
decision must name the same worker with the same costs (bit for bit), reason and predictions.
A change to the kvroute cost formula in Python fails this test until the core follows.
"""
from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from kvroute.kvindex import hashing
from kvroute.kvindex.backend import BACKEND
from kvroute.kvindex.index import KVIndex as PyKVIndex
from kvroute.router import KVRouteWeights, Router
from kvroute.router.pending import PendingPrefixes

pytestmark = pytest.mark.skipif(BACKEND != "native", reason="compiled core not in use (nothing to compare)")

if BACKEND == "native":
    from kvroute.kvindex.native import NativeKVIndex
    from kvroute.router.native import NativePending


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _pair(workers, bs, weights, ttl, seed):
    clk = Clock()
    py = Router(workers, bs, index=PyKVIndex(bs), weights=weights, clock=clk, pending_ttl_s=ttl, seed=seed)
    nat = Router(workers, bs, index=NativeKVIndex(bs), weights=weights, clock=clk, pending_ttl_s=ttl, seed=seed)
    assert py._core is None and nat._core is not None
    return clk, py, nat


def _same(a, b):
    assert a.worker == b.worker, (a, b)
    assert a.costs == b.costs, (a.costs, b.costs)
    assert (a.reason, a.predicted_cached_tokens, a.predicted_gpu_tokens, a.predicted_host_tokens,
            a.predicted_disk_tokens, a.predicted_pending_tokens, a.num_tokens) == \
           (b.reason, b.predicted_cached_tokens, b.predicted_gpu_tokens, b.predicted_host_tokens,
            b.predicted_disk_tokens, b.predicted_pending_tokens, b.num_tokens)


@pytest.mark.parametrize("seed", range(12))
def test_route_same_worker_same_costs(seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 4, 16])
    nw = rng.choice([1, 3, 8, 64, 70])
    workers = [f"w{i}" for i in range(nw)]
    weights = KVRouteWeights(fleet_weight=rng.choice([0.0, 1.5, 3.0]), relief_ratio=rng.choice([1.2, 2.0, 4.0]),
                             kv_high=rng.choice([0.5, 0.9]), decode_weight=rng.choice([0.0, 1.0]))
    clk, py, nat = _pair(workers, bs, weights, rng.choice([0.0, 2.0, 5.0]), seed)
    systems = [[rng.randrange(50_000) for _ in range(bs * rng.randrange(1, 12))] for _ in range(5)]

    def prompt():
        s = rng.choice(systems)
        return s + [rng.randrange(50_000) for _ in range(rng.randrange(0, 4 * bs))]

    live: list = []
    rid = 0
    for step in range(250):
        op = rng.random()
        if op < 0.45:
            p = prompt()
            if rng.random() < 0.3:
                p = np.array(p, dtype=np.uint32)
            kw = {"lora_name": "L"} if rng.random() < 0.1 else {}
            a = py.route(p, request_id=rid, **kw)
            b = nat.route(p, request_id=rid, **kw)
            _same(a, b)
            live.append(rid)
            rid += 1
        elif op < 0.6:  # engines announce some prompts
            w = rng.choice(workers)
            hs = hashing.block_hash_list(prompt(), bs)
            tier = rng.choice(["gpu", "gpu", "host", "disk"])
            if w in py.index:
                py.index.store(w, hs, tier=tier)
                nat.index.store(w, hs, tier=tier)
        elif op < 0.7 and live:
            r = live.pop(rng.randrange(len(live)))
            if rng.random() < 0.5:
                py.prefill_done(r)
                nat.prefill_done(r)
                live.append(r)
            else:
                py.finish(r)
                nat.finish(r)
        elif op < 0.8:
            w = rng.choice(workers)
            if w in py.workers():
                kw = {}
                for name, gen in (("waiting", lambda: rng.randrange(0, 20)), ("running", lambda: rng.randrange(0, 20)),
                                  ("kv_usage", lambda: rng.random()), ("queue_tokens", lambda: rng.randrange(0, 50_000)),
                                  ("capacity_blocks", lambda: rng.randrange(0, 2000))):
                    if rng.random() < 0.4:
                        kw[name] = gen()
                py.update_load(w, **kw)
                nat.update_load(w, **kw)
        elif op < 0.85:
            w = rng.choice(workers)
            if w in py.workers():
                st = rng.choice(["healthy", "draining", "unhealthy"])
                py.set_status(w, st)
                nat.set_status(w, st)
        elif op < 0.88 and len(py.workers()) > 1:
            w = rng.choice(py.workers())
            py.remove_worker(w)
            nat.remove_worker(w)
        elif op < 0.91:
            w = rng.choice(workers)
            py.add_worker(w)
            nat.add_worker(w)
        else:
            clk.t += rng.choice([0.0, 0.5, 1.0, 3.0])
        if not py.healthy_workers():
            py.add_worker(workers[0])
            nat.add_worker(workers[0])
        assert len(py._pending) == len(nat._pending)
    nat._pending.check_invariants()
    nat.index.check_invariants()
    assert py.stats() == nat.stats()


def test_route_same_with_the_kv_room_term_firing():
    """Small GPU caches, long prompts and a moving clock: the wait-for-KV-room term (Python's
    ``room_waits`` over the active-block table) fires, and both paths still pick the same worker
    with the same costs; it must fire for this test to mean anything."""
    rng = random.Random(11)
    bs = 4
    workers = [f"w{i}" for i in range(6)]
    clk = Clock()
    kw = dict(weights=KVRouteWeights(hold_window_s=30.0), clock=clk, pending_ttl_s=2.0, seed=3, capacity_blocks=40)
    py = Router(workers, bs, index=PyKVIndex(bs), **kw)
    nat = Router(workers, bs, index=NativeKVIndex(bs), **kw)
    assert py._core is None and nat._core is not None and py._active is not None and nat._active is not None
    fired = []
    orig = py.policy.room_waits

    def spy(*a):
        r = orig(*a)
        fired.append(r is not None and any(x > 0 for x in r))  # None: 0 for every candidate
        return r

    py.policy.room_waits = spy
    systems = [[rng.randrange(50_000) for _ in range(bs * rng.randrange(2, 20))] for _ in range(6)]
    live: list = []
    for rid in range(400):
        p = rng.choice(systems) + [rng.randrange(50_000) for _ in range(rng.randrange(0, 30 * bs))]
        _same(py.route(p, request_id=rid), nat.route(p, request_id=rid))
        live.append(rid)
        while live and rng.random() < 0.45:
            r = live.pop(rng.randrange(len(live)))
            py.finish(r)
            nat.finish(r)
        clk.t += rng.choice([0.0, 0.1, 0.5, 2.0])
    assert sum(fired) > 20, sum(fired)
    assert py.stats() == nat.stats()


def test_route_ties_use_the_same_rng_draws():
    """Many cold prompts on an idle fleet: every decision is a tie broken by the seeded rng."""
    clk, py, nat = _pair([f"w{i}" for i in range(16)], 4, None, 2.0, 7)
    rng = random.Random(1)
    for i in range(200):
        p = [rng.randrange(1000) for _ in range(rng.randrange(0, 40))]
        _same(py.route(p, request_id=i), nat.route(p, request_id=i))
        if i % 3 == 0:
            py.finish(i)
            nat.finish(i)


def test_pending_table_matches_reference():
    rng = random.Random(5)
    clk = Clock()
    for ttl in (0.0, 1.0):
        ref = PendingPrefixes(ttl, clk)
        from kvroute.kvindex.backend import core

        rc = core.RouterCore(NativeKVIndex(1)._core, ttl, clk(), 1)
        nat = NativePending(rc, clk)
        chains = [[rng.getrandbits(64) for _ in range(rng.randrange(1, 30))] for _ in range(10)]
        for _ in range(2000):
            op = rng.random()
            c = rng.choice(chains)
            c = c[: rng.randrange(1, len(c) + 1)]
            if op < 0.3:
                s = rng.randrange(130)
                ref.add(s, c)
                nat.add(s, c)
            elif op < 0.4:  # a chain in chunks (the router's turns), a clock tick or a forget between them
                s = rng.randrange(130)
                at_ref = at_nat = 0
                hc = nat.chain(c)
                while at_ref < len(c):
                    k = rng.randrange(1, 8)
                    at_ref = ref.add_range(s, c, at_ref, at_ref + k)
                    at_nat = nat.add_range(s, hc, at_nat, at_nat + k)
                    assert at_ref == at_nat
                    if rng.random() < 0.1:
                        clk.t += 0.7
                    if rng.random() < 0.03:
                        ref.forget(s)
                        nat.forget(s)
                    assert ref.match(c) == nat.match(c)
            elif op < 0.8:
                assert ref.match(c) == nat.match(c)
            elif op < 0.85:
                s = rng.randrange(130)
                ref.forget(s)
                nat.forget(s)
            else:
                clk.t += rng.choice([0.3, 0.7, 1.0, 2.5])
            assert len(ref) == len(nat)
        ref.check_invariants()
        nat.check_invariants()


def test_active_table_matches_reference():
    """The compiled active-block table against kvroute/router/active.py on random adds, removes and forgets."""
    from kvroute.router.active import ActiveBlocks
    from kvroute.router.native import NativeActive

    rng = random.Random(9)
    ref, nat = ActiveBlocks(), NativeActive()
    # chains long enough that a slot's table grows past 64 entries and shrinks again on removals
    chains = [[rng.getrandbits(64) for _ in range(rng.randrange(1, 160))] for _ in range(12)]
    held: list = []
    for _ in range(3000):
        op = rng.random()
        c = rng.choice(chains)
        c = c[: rng.randrange(1, len(c) + 1)]
        if op < 0.35:
            s = rng.randrange(70)  # more than 64 slots: masks beyond one word
            assert ref.add(s, c) == nat.add(s, np.array(c, dtype=np.uint64) if rng.random() < 0.3 else c)
            held.append((s, c))
        elif op < 0.6 and held:
            s, c = held.pop(rng.randrange(len(held)))
            assert ref.remove(s, c) == nat.remove(s, c)
        elif op < 0.62:
            s = rng.randrange(70)
            ref.forget(s)
            nat.forget(s)
            held = [(t, c) for t, c in held if t != s]
        else:
            assert ref.match(c) == nat.match(c)
            from kvroute.kvindex.backend import core
            assert nat.match(core.as_hashes(c)) == ref.match(c)
        s = rng.randrange(70)
        assert ref.distinct(s) == nat.distinct(s)
    ref.check_invariants()
    nat.check_invariants()


def test_threads_route_and_store_concurrently():
    """Routing threads and an event thread on one native index: no corruption, every decision valid.

    The GIL is released while long prompts are hashed and while long chains are stored; the
    router's lock serialises the decisions, the core's mutex the tables.
    """
    bs = 4
    idx = NativeKVIndex(bs)
    r = Router([f"w{i}" for i in range(8)], bs, index=idx)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 1 << 20, 4096 * 2, dtype=np.uint32) for _ in range(8)]  # 2,048 blocks: GIL released
    expect = [hashing.block_hash_list(p, bs) for p in prompts]
    errors: list = []

    def events():
        try:
            for k in range(40):
                with r.lock:
                    idx.store(f"w{k % 8}", expect[k % 8])
                    if k % 5 == 4:
                        idx.clear(f"w{(k + 3) % 8}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def routes(base):
        try:
            for k in range(40):
                d = r.route(prompts[k % 8], request_id=(base, k))
                assert d.worker in r.workers()
                r.finish((base, k))
                assert hashing.block_hash_list(prompts[k % 8], bs) == expect[k % 8]
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    ts = [threading.Thread(target=events)] + [threading.Thread(target=routes, args=(b,)) for b in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    idx.check_invariants()
    r._pending.check_invariants()
    assert r.in_flight() == 0
