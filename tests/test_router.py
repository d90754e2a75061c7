"""Router core: load accounting, worker lifecycle, speculative prefixes, disaggregation, properties."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute import KVRouteError, block_hashes
from kvroute.router import (
    POLICIES,
    DuplicateRequestError,
    KVRouteWeights,
    NoHealthyWorkerError,
    Router,
    UnknownPolicyError,
    UnknownRequestError,
    UnknownWorkerError,
)
from kvroute.router.pending import PendingPrefixes


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def toks(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50_000, n).tolist()


# ------------------------------------------------------------------ basics
def test_route_tokens_equals_route_hashes_and_matches_index():
    r = Router(["a", "b"], 16)
    p = toks(1, 100)
    r.index.store("b", block_hashes(p, 16)[:4])
    d = r.route(p, request_id="x")
    assert d.worker == "b" and d.predicted_cached_tokens == 64 and d.num_tokens == 100
    assert d.predicted_by_tier == {"gpu": 64, "host": 0, "disk": 0}
    r2 = Router(["a", "b"], 16)
    r2.index.store("b", block_hashes(p, 16)[:4])
    d2 = r2.route_hashes(block_hashes(p, 16), num_tokens=100, request_id="x")
    assert d2.costs == d.costs and d2.worker == d.worker


def test_lora_and_salt_namespaces():
    r = Router(["a", "b"], 16)
    p = toks(2, 64)
    r.index.store("a", block_hashes(p, 16, lora_name="L1"))
    assert r.route(p, request_id=1, lora_name="L1").predicted_cached_tokens == 64
    assert r.route(p, request_id=2).predicted_cached_tokens == 0
    assert r.route(p, request_id=3, lora_name="L1", cache_salt="s").predicted_cached_tokens == 0


def test_tiers_in_prediction():
    r = Router(["a"], 16, pending_ttl_s=0)
    hs = list(range(1, 9))
    r.index.store("a", hs[:2])
    r.index.store("a", hs[2:5], tier="host")
    r.index.store("a", hs[5:6], tier="disk")
    d = r.route_hashes(hs, num_tokens=128, request_id=1)
    assert (d.predicted_gpu_tokens, d.predicted_host_tokens, d.predicted_disk_tokens) == (32, 48, 16)
    assert d.predicted_cached_tokens == 96


def test_load_accounting_prefill_done_and_finish():
    r = Router(["a"], 16, pending_ttl_s=0)
    r.index.store("a", [1, 2])
    r.route_hashes([1, 2, 3, 4], num_tokens=70, request_id="q")
    s = r.worker_state("a")
    assert (s.prefill_tokens, s.prefill_requests, s.decode_blocks, s.active_requests) == (70 - 32, 1, 4, 1)
    r.prefill_done("q")
    r.prefill_done("q")  # idempotent
    assert (s.prefill_tokens, s.prefill_requests, s.decode_blocks, s.active_requests) == (0, 0, 4, 1)
    r.finish("q")
    assert (s.prefill_tokens, s.decode_blocks, s.active_requests) == (0, 0, 0)
    with pytest.raises(UnknownRequestError):
        r.finish("q")
    with pytest.raises(UnknownRequestError):
        r.prefill_done("nope")


def test_request_ttl_releases_requests_whose_finish_never_came():
    clk = Clock()
    r = Router(["a", "b"], 16, pending_ttl_s=0, clock=clk, request_ttl_s=10.0)
    r.route_hashes([1, 2], num_tokens=32, request_id="lost")
    clk.t = 5.0
    r.route_hashes([3, 4], num_tokens=40, request_id="kept")
    r.prefill_done("kept")
    clk.t = 10.0  # "lost" is 10 s old: released at the next decision, "kept" (5 s) stays
    r.route_hashes([5], num_tokens=16, request_id="new")
    assert r.in_flight() == 2 and r.expired_requests == 1 and r.stats()["expired_requests"] == 1
    with pytest.raises(UnknownRequestError):
        r.finish("lost")
    r.finish("new")
    r.finish("kept")
    for w in ("a", "b"):  # every unit of load the three requests added is gone
        s = r.worker_state(w)
        assert (s.prefill_tokens, s.prefill_requests, s.decode_blocks, s.active_requests) == (0, 0, 0, 0)
    r.route_hashes([1], num_tokens=16, request_id="lost")  # an expired id may be reused
    clk.t = 100.0
    r.route_hashes([1], num_tokens=16, request_id="lost")  # the old one expired: no DuplicateRequestError
    assert r.in_flight() == 1 and r.expired_requests == 2
    with pytest.raises(ValueError):
        Router(["a"], 16, request_ttl_s=0)
    assert Router(["a"], 16).request_ttl_s is None


def test_typed_errors():
    r = Router(["a"], 16)
    r.route_hashes([1], num_tokens=16, request_id=1)
    with pytest.raises(DuplicateRequestError):
        r.route_hashes([1], num_tokens=16, request_id=1)
    with pytest.raises(UnknownPolicyError):
        Router(["a"], 16, policy="nope")
    with pytest.raises(UnknownWorkerError):
        r.drain_worker("zz")
    with pytest.raises(ValueError):
        r.update_load("a", kv_usage=1.5)
    with pytest.raises(ValueError):
        r.update_load("a", waiting=-1)
    for e in (DuplicateRequestError, UnknownPolicyError, NoHealthyWorkerError, UnknownRequestError):
        assert issubclass(e, KVRouteError)


def test_worker_lifecycle_while_routing():
    r = Router(["a", "b"], 16)
    r.route_hashes([1, 2], num_tokens=32, request_id=1)
    r.drain_worker("a")
    r.mark_unhealthy("b")
    with pytest.raises(NoHealthyWorkerError):
        r.route_hashes([1, 2], num_tokens=32, request_id=2)
    r.add_worker("c")
    assert r.route_hashes([1, 2], num_tokens=32, request_id=3).worker == "c"
    r.mark_unhealthy("b", False)
    r.index.store("b", [7, 8])
    assert r.route_hashes([7, 8], num_tokens=32, request_id=4).worker == "b"
    r.remove_worker("b")
    assert "b" not in r.index and "b" not in r.workers()
    r.finish(4)  # finishing a request of a removed worker is fine
    r.finish(1)
    assert r.worker_state("a").active_requests == 0
    # a new worker reuses the removed one's pending slot without inheriting its pending prefixes
    r.add_worker("d")
    d = r.route_hashes([7, 8], num_tokens=32, request_id=5)
    assert d.costs and all(v >= 0 for v in d.costs.values())
    assert d.predicted_cached_tokens == 0


# ------------------------------------------------------------------ speculative prefixes
def test_burst_sharing_a_new_prefix_lands_together():
    """A busy fleet; a burst of 8 requests sharing a new 2048-token prefix, no engine events yet."""
    clock = Clock()
    r = Router([f"w{i}" for i in range(8)], 16, clock=clock)
    for i in range(8):
        r.route(toks(100 + i, 1024), request_id=f"bg{i}")  # background prefill work everywhere
    prefix = toks(7, 2048)
    picks = [r.route(prefix + toks(200 + j, 32), request_id=j).worker for j in range(8)]
    assert len(set(picks)) == 1
    # Dynamo's per-request greedy logit, on identical state, scatters the same burst
    rd = Router([f"w{i}" for i in range(8)], 16, policy="dynamo", clock=clock)
    for i in range(8):
        rd.route(toks(100 + i, 1024), request_id=f"bg{i}")
    picks_d = [rd.route(prefix + toks(200 + j, 32), request_id=j).worker for j in range(8)]
    assert len(set(picks_d)) >= 4


def test_pending_expires_and_events_take_over():
    clock = Clock()
    r = Router(["a", "b"], 16, clock=clock, pending_ttl_s=2.0)
    p = toks(3, 256)
    first = r.route(p, request_id=1).worker
    r.finish(1)
    d = r.route(p, request_id=2)
    assert d.worker == first and d.predicted_pending_tokens == 256
    r.finish(2)
    clock.t = 4.5  # more than 2 x TTL: every speculative entry is gone
    d = r.route(p, request_id=3)
    assert d.predicted_cached_tokens == 0
    r.finish(3)
    clock.t = 10.0
    r.index.store("b", block_hashes(p, 16))  # the engine confirmed it on b
    d = r.route(p, request_id=4)
    assert d.worker == "b" and d.predicted_pending_tokens == 0 and d.predicted_cached_tokens == 256


def test_pending_table_lifetime_bounds():
    clock = Clock()
    pp = PendingPrefixes(1.0, clock)
    pp.add(3, [1, 2, 3])
    clock.t = 0.99
    pp.expire()
    assert pp.match([1, 2, 3, 4]) == {3: 3}
    clock.t = 1.5
    pp.expire()  # rotates: still visible in the previous generation
    assert pp.match([1, 2]) == {3: 2}
    pp.add(5, [1, 9])
    clock.t = 2.6
    pp.expire()
    assert pp.match([1, 2, 3]) == {5: 1}
    pp.forget(5)
    assert pp.match([1, 9]) == {} and len(pp) == 0
    pp.check_invariants()


# ------------------------------------------------------------------ disaggregation
def test_disaggregated_pools():
    r = Router(["p0", "p1"], 16, decode_workers=["d0", "d1"], capacity_blocks=100, pending_ttl_s=0)
    hs = list(range(1, 11))
    r.index.store("p1", hs[:8])
    r.route_hashes([50 + i for i in range(30)], num_tokens=480, request_id="big")
    r.prefill_done("big")  # its prompt now only occupies a decode worker
    d = r.route_hashes(hs, num_tokens=160, request_id="x")
    assert d.prefill_worker == d.worker == "p1" and d.predicted_cached_tokens == 128
    big = r._requests["big"].decode.id
    assert d.decode_worker != big and d.decode_worker in ("d0", "d1")
    # d_other: (0 + 10)/100 + 0 ; d_big: (30 + 10)/100 + 1 * 1/1
    assert d.decode_costs[d.decode_worker] == pytest.approx(0.1)
    assert d.decode_costs[big] == pytest.approx(0.4 + 1.0)
    p1, dec = r.worker_state("p1"), r.worker_state(d.decode_worker)
    assert p1.prefill_tokens == 32 and p1.decode_blocks == 0 and dec.decode_blocks == 10
    r.prefill_done("x")
    assert p1.active_requests == 0 and dec.active_requests == 1
    r.finish("x")
    assert dec.decode_blocks == 0 and dec.active_requests == 0
    r.drain_worker("d0")
    r.drain_worker("d1")
    with pytest.raises(NoHealthyWorkerError):
        r.route_hashes(hs, num_tokens=160, request_id="y")


def test_decode_worker_avoids_overflow():
    r = Router(["p"], 16, decode_workers=["small", "large"], pending_ttl_s=0)
    r.add_worker("small", role="decode", capacity_blocks=5)
    r.add_worker("large", role="decode", capacity_blocks=1000)
    r.route_hashes(list(range(900, 1800)), num_tokens=900 * 16, request_id="fill")  # large: 900/1000
    d = r.route_hashes(list(range(1, 11)), num_tokens=160, request_id=1)
    assert d.decode_worker == "large"  # 10 blocks do not fit in small's 5


# ------------------------------------------------------------------ properties
workers_st = st.integers(2, 6)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=workers_st, policy=st.sampled_from(sorted(POLICIES)))
def test_decision_is_always_an_accepting_worker(data, n, policy):
    r = Router([f"w{i}" for i in range(n)], 4, policy=policy, seed=data.draw(st.integers(0, 9)))
    live: list[int] = []
    for step in range(data.draw(st.integers(1, 25))):
        op = data.draw(st.sampled_from(["route", "route", "route", "status", "finish", "store", "add", "remove"]))
        if op == "route":
            L = data.draw(st.integers(1, 6))
            base = data.draw(st.integers(0, 3))
            hs = [base * 100 + j for j in range(L)]
            try:
                d = r.route_hashes(hs, num_tokens=4 * L + 1, request_id=step)
            except NoHealthyWorkerError:
                assert not r.healthy_workers()
                continue
            assert d.worker in r.healthy_workers()
            live.append(step)
        elif op == "status" and r.workers():
            w = data.draw(st.sampled_from(r.workers()))
            r.set_status(w, data.draw(st.sampled_from(["healthy", "draining", "unhealthy"])))
        elif op == "finish" and live:
            r.finish(live.pop(data.draw(st.integers(0, len(live) - 1))))
        elif op == "store" and r.workers():
            w = data.draw(st.sampled_from(r.workers()))
            base = data.draw(st.integers(0, 3))
            r.index.store(w, [base * 100 + j for j in range(data.draw(st.integers(1, 6)))])
        elif op == "add":
            r.add_worker(f"n{step}")
        elif op == "remove" and len(r.workers()) > 1:
            r.remove_worker(data.draw(st.sampled_from(r.workers())))
    for rid in live:
        r.finish(rid)
    for s in (r.worker_state(w) for w in r.workers()):
        assert (s.prefill_tokens, s.decode_blocks, s.active_requests, s.prefill_requests) == (0, 0, 0, 0)
    r.index.check_invariants()


@settings(max_examples=40, deadline=None)
@given(depths=st.lists(st.integers(0, 12), min_size=2, max_size=6), tiers=st.data())
def test_zero_load_longest_overlap_wins(depths, tiers):
    if max(depths) == 0:
        return
    r = Router([f"w{i}" for i in range(len(depths))], 16, pending_ttl_s=0)
    hs = list(range(1, 13))
    for i, d in enumerate(depths):
        if d:
            r.index.store(f"w{i}", hs[:d], tier=tiers.draw(st.sampled_from(["gpu", "host"])))
    dec = r.route_hashes(hs, num_tokens=12 * 16, request_id=1)
    assert dec.predicted_cached_tokens == 16 * max(depths)


@settings(max_examples=40, deadline=None)
@given(loads=st.lists(st.integers(0, 5000), min_size=2, max_size=6), depth=st.integers(0, 8))
def test_equal_overlap_least_loaded_wins(loads, depth):
    r = Router([f"w{i}" for i in range(len(loads))], 16, pending_ttl_s=0)
    hs = list(range(1, 9))
    for i, q in enumerate(loads):
        if depth:
            r.index.store(f"w{i}", hs[:depth])
        r.update_load(f"w{i}", queue_tokens=q)
    d = r.route_hashes(hs, num_tokens=128, request_id=1)
    assert r.worker_state(d.worker).reported_queue_tokens == min(loads)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 8), k=st.integers(1, 40), hold=st.booleans())
def test_cold_prompts_fair_share(n, k, hold):
    r = Router([f"w{i}" for i in range(n)], 16)
    counts: dict[str, int] = {}
    for i in range(k):
        w = r.route_hashes([10_000 + i, 20_000 + i], num_tokens=32, request_id=i).worker
        counts[w] = counts.get(w, 0) + 1
        if not hold:
            r.finish(i)
    assert max(counts.values()) <= math.ceil(k / n)


def test_weights_dataclass_and_dict():
    r = Router(["a"], 16, weights={"fleet_weight": 0.0})
    assert isinstance(r.policy.weights, KVRouteWeights) and r.policy.weights.fleet_weight == 0.0
    with pytest.raises(TypeError):
        Router(["a"], 16, policy="dynamo", weights=KVRouteWeights())


def test_role_changes_switch_disaggregation():
    r = Router(["a", "b"], 16)
    r.add_worker("b", role="decode")
    d = r.route_hashes([1], num_tokens=16, request_id=1)
    assert (d.prefill_worker, d.decode_worker) == ("a", "b")
    r.add_worker("b", role="both")  # back to an aggregated fleet
    d = r.route_hashes([2], num_tokens=16, request_id=2)
    assert d.prefill_worker is None and d.decode_worker is None


def test_membership_changes_concurrent_with_routing():
    """One thread routes while another adds, drains, marks and removes workers."""
    import threading

    r = Router([f"w{i}" for i in range(4)], 16)
    errors: list[BaseException] = []
    done = threading.Event()

    def churn() -> None:
        try:
            for k in range(300):
                w = f"x{k % 7}"
                r.add_worker(w)
                with r.lock:  # the index is mutated under the router's lock (as the event subscriber does)
                    r.index.store(w, [1, 2, 3])
                if k % 3 == 0:
                    r.drain_worker(w)
                if k % 5 == 0:
                    r.mark_unhealthy(f"w{k % 4}", k % 10 == 0)
                if k % 2 == 0:
                    r.remove_worker(w)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=churn)
    t.start()
    i = 0
    while not done.is_set() or i < 300:
        try:
            d = r.route_hashes([1, 2, 3, 4 + i], num_tokens=64, request_id=i)
            assert d.worker in r.workers() or d.worker.startswith("x")
        except NoHealthyWorkerError:
            pass
        if i % 2:
            try:
                r.finish(i)
            except UnknownRequestError:
                pass
        i += 1
    t.join()
    assert not errors
    r.index.check_invariants()


def test_route_exclude_skips_workers_for_one_request_only() -> None:
    from kvroute.router import NoHealthyWorkerError, RouteHints

    r = Router(["a", "b"], 16, policy="round_robin")
    toks = list(range(64))
    assert r.route(toks, request_id=1, exclude={"a"}).worker == "b"
    assert r.route(toks, request_id=2, exclude={"b"}).worker == "a"
    with pytest.raises(NoHealthyWorkerError):
        r.route(toks, request_id=3, exclude={"a", "b"})
    assert r.in_flight() == 2  # the refused request left nothing behind
    d = r.route(toks, request_id=4, hints=RouteHints(session_id="s1", user="u"))
    assert d.hints == RouteHints(session_id="s1", user="u")
    assert sorted(r.healthy_workers()) == ["a", "b"]
