"""Per-policy unit tests with hand-computed costs (pure score functions and decisions)."""
from __future__ import annotations

import random

import pytest

from kvroute.router import POLICIES, Router
from kvroute.router.policies import baselines, dynamo, kvroute_cost, llmd, preble, sglang
from kvroute.router.types import Candidate, Role, RouteRequest, WorkerState


def state(order=0, **kw) -> WorkerState:
    s = WorkerState(f"w{order}", order, Role.BOTH)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


REQ = RouteRequest("r", num_tokens=100, num_blocks=6, block_size=16)


def test_registry_names():
    assert set(POLICIES) == {"kvroute", "dynamo", "sglang", "llmd", "preble", "round_robin", "least_loaded", "power_of_two"}
    for name, cls in POLICIES.items():
        assert cls.name == name
        cls()  # default weights build


# ---------------------------------------------------------------- kvroute (ours)
def test_kvroute_ttft_hand_computed():
    w = kvroute_cost.KVRouteWeights()
    c = Candidate(state(prefill_tokens=1000, decode_blocks=10), total=4, gpu=2, host=1, disk=1)
    queue = 1000 * 3.2e-5
    prefill = (100 - 64) * 3.2e-5
    reload = 16 * (2.4e-6 + 1.9e-5)
    decode = 16 * 10 * 4e-8
    assert kvroute_cost.ttft(REQ, c, w) == pytest.approx(queue + prefill + reload + decode, rel=1e-12)
    fleet = 1.5 * 0.5 * 16 * (6 - 4) * 3.2e-5  # fleet_weight 1.5
    assert kvroute_cost.fleet_cost(REQ, c, w, best_total=6, busy=0.5) == pytest.approx(fleet)
    assert kvroute_cost.score(REQ, c, w, best_total=6, busy=0.5) == pytest.approx(queue + prefill + reload + decode + fleet)


def test_kvroute_reported_queue_and_kv_pressure():
    w = kvroute_cost.KVRouteWeights()
    # reported waiting requests count at reported_request_tokens each; the larger of router/report is used
    s = state(prefill_tokens=500, reported_waiting=2, reported_kv_usage=0.95)
    c = Candidate(s)
    prefill = 100 * 3.2e-5
    kv = 1.0 * (0.95 - 0.9) / 0.1 * prefill
    assert kvroute_cost.ttft(REQ, c, w) == pytest.approx(2048 * 3.2e-5 + prefill + kv)
    s.reported_queue_tokens = 100  # explicit token count wins over the request estimate; router count is larger
    assert kvroute_cost.ttft(REQ, c, w) == pytest.approx(500 * 3.2e-5 + prefill + kv)


def test_kvroute_fleet_term_keeps_prefix_together_on_busy_fleet():
    # two workers, both busy with 1000 queued tokens; w0 holds 5 of 6 blocks
    r = Router(["a", "b"], 16, seed=3)
    for x in ("a", "b"):
        r.update_load(x, queue_tokens=1000)
    hs = list(range(1, 7))
    r.index.store("a", hs[:5])
    d = r.route_hashes(hs, num_tokens=100, request_id=1)
    t = 3.2e-5
    assert d.costs["a"] == pytest.approx((1000 + 20) * t)
    assert d.costs["b"] == pytest.approx((1000 + 100) * t + 1.5 * 1.0 * 16 * 5 * t)  # weight 1.5 x pressure 1
    assert d.worker == "a" and d.predicted_cached_tokens == 80 and d.predicted_gpu_tokens == 80


def test_kvroute_relief_rule_replicates_hot_prefix():
    # With a fleet weight so high that min-cost would never leave the cached worker,
    # the relief rule still replicates once its TTFT exceeds relief_ratio x the best TTFT.
    w = kvroute_cost.KVRouteWeights(fleet_weight=10.0, relief_ratio=2.0)
    r = Router(["hot", "x", "y"], 16, weights=w)
    hs = list(range(100, 360))  # 260 blocks = 4160 tokens
    r.index.store("hot", hs[:256])  # 4096 cached
    for q, expect in ((10000, "hot"), (10400, "x|y")):
        for x in ("x", "y"):
            r.update_load(x, queue_tokens=1000)
        r.update_load("hot", queue_tokens=q)
        d = r.route_hashes(hs, num_tokens=4160, request_id=q)
        r.finish(q)
        # ttft_hot = (q + 64) t ; best ttft elsewhere = (1000 + 4160) t ; relief iff q + 64 > 2 * 5160
        if expect == "hot":
            assert d.worker == "hot" and d.reason.startswith("min-cost")
        else:
            assert d.worker in ("x", "y") and d.reason == "replicate: hot-prefix relief"


def test_kvroute_default_replicates_when_load_outweighs_cache():
    # busy fleet (pressure 1): cost_x = (1000 + 4160) t + 1.5 x 4096 t = 11304 t ; cost_hot = (q + 64) t
    # relief (ratio 2): ttft_hot > 2 x ttft_x = 10320 t
    for relief, q_stay, q_move, reason in ((2.0, 9000, 10300, "replicate: hot-prefix relief"),
                                           (100.0, 11230, 11260, "replicate: load outweighs cache")):
        r = Router(["hot", "x"], 16, pending_ttl_s=0, weights={"relief_ratio": relief})  # index only
        hs = list(range(100, 360))
        r.index.store("hot", hs[:256])
        r.update_load("x", queue_tokens=1000)
        r.update_load("hot", queue_tokens=q_stay)
        d = r.route_hashes(hs, num_tokens=4160, request_id=1)
        assert d.worker == "hot" and d.reason == "min-cost: best cached"
        r.finish(1)
        r.update_load("hot", queue_tokens=q_move)
        d = r.route_hashes(hs, num_tokens=4160, request_id=2)
        assert d.worker == "x" and d.reason == reason


# ---------------------------------------------------------------- dynamo
def test_dynamo_logit_hand_computed():
    w = dynamo.DynamoWeights()
    c = Candidate(state(prefill_tokens=32, decode_blocks=9, active_blocks=7), total=4, gpu=2, host=2, active=2)
    # credit = 2 + 0.75*2 = 3.5 ; (32 + 100)/16 = 8.25 ; 8.25 - 3.5 = 4.75
    # decode (assume_kv_reuse) = 7 distinct active + (6 prompt blocks - 2 already active) = 11
    assert dynamo.score(REQ, c, w) == pytest.approx(4.75 + 11)
    # without kv reuse: every in-flight prompt's blocks (9) + all 6 new ones
    assert dynamo.score(REQ, c, dynamo.DynamoWeights(assume_kv_reuse=False)) == pytest.approx(4.75 + 15)
    c2 = Candidate(state(prefill_tokens=0, decode_blocks=0), total=6, gpu=6)
    assert dynamo.score(REQ, c2, w) == pytest.approx(0.25 + 6)  # prefill never negative: max(0, 6.25 - 6)
    w2 = dynamo.DynamoWeights(prefill_load_scale=2.0, active_requests_weight=0.5)
    c.state.active_requests = 4
    assert dynamo.score(REQ, c, w2) == pytest.approx(2 * 4.75 + 11 + 2)


def test_dynamo_books_host_and_disk_hits_partly_as_prefill():
    p = dynamo.DynamoPolicy()
    c = Candidate(state(), total=6, gpu=2, host=2, disk=2)
    # isl 100 - 16 * (2 + 0.75*2 + 0.25*2) = 100 - 64 = 36 (plain uncached would be 4)
    assert p.booked_prefill_tokens(REQ, c) == 36


def test_dynamo_counts_shared_active_blocks_once():
    r = Router(["a", "b"], 16, policy="dynamo", clock=lambda: 0.0)
    hs = list(range(1, 9))
    r.route_hashes(hs, num_tokens=128, request_id=1)
    w = r.stats()["workers"]
    hot = next(x for x in w if x["active_requests"] == 1)["worker"]
    # a second request sharing the first 6 blocks, forced onto the same worker
    r.mark_unhealthy("b" if hot == "a" else "a")
    r.route_hashes(hs[:6] + [50, 51], num_tokens=128, request_id=2)
    s = r.worker_state(hot)
    assert s.decode_blocks == 16 and s.active_blocks == 10
    r.finish(1)
    assert r.worker_state(hot).active_blocks == 8
    r.finish(2)
    assert r.worker_state(hot).active_blocks == 0
    r._active.check_invariants()


def test_dynamo_ignores_pending_and_scatters_a_burst():
    r = Router([f"w{i}" for i in range(4)], 16, policy="dynamo", clock=lambda: 0.0)
    hs = list(range(1, 65))
    picks = [r.route_hashes(hs, num_tokens=1024, request_id=i).worker for i in range(4)]
    assert len(set(picks)) == 4  # each sees no cache and the others' prefill load


def test_dynamo_softmax_temperature_is_seeded():
    def run(seed):
        r = Router([f"w{i}" for i in range(4)], 16, policy="dynamo", weights={"temperature": 1.0}, seed=seed)
        out = []
        for i in range(20):
            out.append(r.route_hashes([i + 1], num_tokens=16, request_id=i).worker)
            r.finish(i)
        return out
    assert run(1) == run(1)
    assert len(set(run(1))) > 1


# ---------------------------------------------------------------- sglang
def test_sglang_branches():
    w = sglang.SGLangWeights()
    assert sglang.score(REQ, Candidate(state(), total=2), w) == pytest.approx(32 / 100)
    r = Router(["a", "b", "c"], 16, policy="sglang_first", pending_ttl_s=0)
    hs = list(range(1, 7))
    r.index.store("b", hs[:2])  # 32/100 = 0.32 > 0.3 -> deepest match
    d = r.route_hashes(hs, num_tokens=100, request_id="m")
    assert d.worker == "b" and d.reason == "cache: deepest match"
    assert r.policy.tree_size("b") == 100 - 32
    r.finish("m")
    r.index.store("c", hs[:1])
    hs2 = [hs[0], 99, 98, 97, 96, 95]  # 16/100 = 0.16 < 0.3 -> smallest tree: a (0) < b (68)
    d = r.route_hashes(hs2, num_tokens=100, request_id="x")
    assert d.worker == "a" and d.reason.startswith("miss") and d.costs == {"a": 0, "b": 68, "c": 0}
    assert r.policy.tree_size("a") == 100
    r.finish("x")
    d = r.route_hashes([500], num_tokens=16, request_id="y")  # miss: c (0) is the smallest tree now
    assert d.worker == "c"
    r.finish("y")
    # b keeps the cache branch until 65 requests are in flight there and none elsewhere:
    # 65 - 0 > 64 and 65 > 0 * 1.5 -> imbalanced -> least loaded, first on ties
    for i in range(65):
        d = r.route_hashes(hs, num_tokens=100, request_id=f"load{i}")
        assert d.worker == "b" and d.reason.startswith("cache")
    d = r.route_hashes(hs, num_tokens=100, request_id="i")
    assert d.worker == "a" and d.reason.startswith("imbalanced")


def test_sglang_first_variant_piles_tied_misses_on_the_first_worker():
    """``sglang_first``: misses while the trees tie all go to the first worker, whatever its load."""
    r = Router(["a", "b", "c"], 16, policy="sglang_first")
    hs = list(range(1, 9))
    r.index.store("a", hs)
    for i in range(10):  # fully cached on a: the cache branch, and nothing new enters a's tree
        assert r.route_hashes(hs, num_tokens=128, request_id=i).worker == "a"
    assert r.policy.tree_size("a") == 0 and r.worker_state("a").active_requests == 10
    # trees tie at 0: a cold miss goes to a, the busiest worker, not to an idle one
    d = r.route_hashes([999], num_tokens=16, request_id="cold")
    assert d.worker == "a" and d.reason == "miss: smallest tree"
    # equal cold prompts then rotate only because each one grows the tree it lands on
    picks = [r.route_hashes([2000 + i], num_tokens=16, request_id=100 + i).worker for i in range(4)]
    assert picks == ["b", "c", "a", "b"]


def test_sglang_ties_land_on_an_arbitrary_worker():
    """The real router scans a hash map: tied misses do not all land on the first worker."""
    picks = set()
    for seed in range(8):
        r = Router(["a", "b", "c"], 16, policy="sglang", seed=seed)
        picks.add(r.route_hashes([999], num_tokens=16, request_id="cold").worker)
    assert len(picks) > 1
    assert "sglang_first" not in POLICIES and "sglang" in POLICIES


def test_kvroute_spreads_the_same_cold_misses():
    r = Router(["a", "b", "c"], 16)
    picks = []
    for i in range(9):
        picks.append(r.route_hashes([1000 + i], num_tokens=16, request_id=i).worker)
        r.finish(i)
    assert sorted(picks) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3


# ---------------------------------------------------------------- llm-d
def test_llmd_score_hand_computed():
    req = RouteRequest("r", num_tokens=160, num_blocks=10, block_size=16)
    c = Candidate(state(reported_kv_usage=0.5, active_requests=2), total=8, gpu=4, host=2, pending=2)
    # current llm-d: weights 2:1:1, no speculative blocks: prefix = (4 + 0.8*2)/10 = 0.56
    w = llmd.LLMDWeights()
    assert llmd.score(req, c, w, min_q=0, max_q=4) == pytest.approx(2 * 0.56 + 0.5 + (4 - 0) / 4)
    # llmd_v0: 3:2:2, speculative: prefix = (1.0*(4+2) + 0.8*2)/10 = 0.76 ; queue = in flight (2) -> (4-2)/4
    w0 = llmd.LLMDv0Weights()
    assert llmd.score(req, c, w0, min_q=0, max_q=4) == pytest.approx(3 * 0.76 + 2 * 0.5 + 2 * 0.5)
    assert llmd.score(req, c, w0, min_q=2, max_q=2) == pytest.approx(3 * 0.76 + 2 * 0.5 + 2 * 1.0)


def test_llmd_queue_scorer_sees_the_waiting_queue_only():
    r = Router(["a", "b"], 16, policy="llmd")
    assert r.policy.uses_pending is False
    hs = list(range(1, 11))
    r.index.store("a", hs)
    r.update_load("a", waiting=0, running=30)  # busy decoding, nothing waiting: llm-d's queue scorer ignores it
    r.update_load("b", waiting=0, running=0)
    d = r.route_hashes(hs, num_tokens=160, request_id=1)
    assert d.worker == "a" and d.costs == {"a": pytest.approx(-4.0), "b": pytest.approx(-2.0)}
    r.update_load("a", waiting=3)
    d = r.route_hashes(hs, num_tokens=160, request_id=2)
    # a: 2*1 + 1 + 0 = 3 ; b: 0 + 1 + 1 = 2
    assert d.worker == "a" and d.costs == {"a": pytest.approx(-3.0), "b": pytest.approx(-2.0)}


# ---------------------------------------------------------------- preble
def test_preble_explore_cost_hand_computed():
    w = preble.PrebleWeights()
    req = RouteRequest("r", num_tokens=160, num_blocks=10, block_size=16)
    c = Candidate(state(capacity_blocks=100, decode_blocks=98), total=4, gpu=4)
    # evict (98 + 6 - 100) = 4 blocks = 64 tokens ; prefill 96 tokens ; + window load 0.5 s
    assert preble.score(req, c, w, window_load_s=0.5) == pytest.approx(0.5 + 64 * 3.2e-5 + 96 * 3.2e-5)


def test_preble_v0_exploit_explore_and_replicate():
    t = [0.0]
    r = Router(["a", "b", "c"], 16, policy="preble_v0", clock=lambda: t[0])
    hs = list(range(1, 11))
    r.index.store("b", hs[:6])  # 96 cached > 64 new -> exploit
    d = r.route_hashes(hs, num_tokens=160, request_id=1)
    assert d.worker == "b" and d.reason.startswith("exploit")
    r.index.store("c", hs[:4])
    d = r.route_hashes([hs[0], hs[1], hs[2], hs[3], 50, 51, 52, 53, 54, 55], num_tokens=160, request_id=2)
    # 64 cached < 96 new -> explore: a = 0 + 160 t ; b = window load (0.1 s decode estimate) + 160 t ; c = 96 t
    assert d.reason.startswith("explore") and d.worker == "c"
    assert d.costs["a"] == pytest.approx(160 * 3.2e-5) and d.costs["c"] == pytest.approx(96 * 3.2e-5)
    assert d.costs["b"] == pytest.approx(0.1 + 160 * 3.2e-5)
    # make b hot: keep exploiting it until its windowed load exceeds 2x the mean -> replicate elsewhere
    reasons = []
    for i in range(3, 12):
        reasons.append(r.route_hashes(hs, num_tokens=160, request_id=i).reason)
    assert "explore: hot prefix replicated" in reasons
    # the window forgets: 200 s later b is cold again and exploited
    t[0] = 200.0
    d = r.route_hashes(list(range(1, 11)), num_tokens=160, request_id=99)
    assert d.reason.startswith("exploit")


def test_preble_readded_worker_keeps_its_new_load_when_old_history_expires():
    t = [0.0]
    r = Router(["a", "b"], 16, policy="preble_v0", clock=lambda: t[0], pending_ttl_s=0)
    pol = r.policy
    r.route_hashes([1, 2], num_tokens=32, request_id=1)
    r.route_hashes([3], num_tokens=16, request_id=2)
    assert pol.window_load("a") > 0 and pol.window_load("b") > 0  # cold requests spread: "a" has history
    r.remove_worker("a")
    r.remove_worker("b")
    t[0] = 100.0
    r.add_worker("a")
    r.route_hashes([4, 5, 6], num_tokens=48, request_id=3)
    new = pol.window_load("a")
    assert new == pytest.approx(48 * 3.2e-5 + 0.1)
    t[0] = 190.0  # the entries from t=0 leave the window; the one from t=100 stays
    r.route_hashes([7], num_tokens=16, request_id=4)
    assert pol.window_load("a") == pytest.approx(new + 16 * 3.2e-5 + 0.1)


def test_preble_decode_work_and_rebalancing():
    w = preble.PrebleWeights()
    req = RouteRequest("r", num_tokens=160, num_blocks=10, block_size=16)
    assert preble.decode_work(req, w) == pytest.approx(256 * (2.5e-4 + 160 * 4.0e-8))
    t = [0.0]
    r = Router(["a", "b"], 16, policy="preble", clock=lambda: t[0], pending_ttl_s=0)
    hs = list(range(1, 11))
    r.index.store("a", hs)
    reasons = []
    for i in range(60):  # the prefix lives on a: exploit until a has 50 requests and 1.5x b's cost
        d = r.route_hashes(hs, num_tokens=160, request_id=i)
        reasons.append((d.worker, d.reason))
        t[0] += 0.5
    assert reasons[0] == ("a", "exploit: longest match")
    assert all(x == ("a", "exploit: longest match") for x in reasons[:50])
    assert reasons[50] == ("b", "rebalance: prefix moved to lightest")


# ---------------------------------------------------------------- baselines
def test_round_robin_cycles_and_skips_unhealthy():
    r = Router(["a", "b", "c"], 16, policy="round_robin")
    picks = [r.route_hashes([i + 1], num_tokens=16, request_id=i).worker for i in range(4)]
    assert picks == ["a", "b", "c", "a"]
    r.mark_unhealthy("b")
    picks = [r.route_hashes([i + 1], num_tokens=16, request_id=10 + i).worker for i in range(3)]
    assert picks == ["c", "a", "c"]


def test_least_loaded_and_power_of_two():
    r = Router(["a", "b"], 16, policy="least_loaded")
    r.update_load("a", running=3)
    assert r.route_hashes([1], num_tokens=16, request_id=1).worker == "b"
    assert baselines.score(REQ, Candidate(state(active_requests=2, prefill_tokens=0))) == 2.0
    r2 = Router(["a", "b"], 16, policy="power_of_two", seed=5)
    r2.update_load("b", running=1)
    for i in range(10):  # with two workers both are sampled: the less loaded always wins
        assert r2.route_hashes([i + 1], num_tokens=16, request_id=i).worker == "a"
        r2.finish(i)


def test_policies_are_pure_on_identical_state():
    """Two routers with the same seed and the same inputs decide the same, for every policy."""
    for name in POLICIES:
        outs = []
        for _ in range(2):
            r = Router([f"w{i}" for i in range(5)], 16, policy=name, seed=11, clock=lambda: 1.0)
            rng = random.Random(0)
            r.index.store("w2", list(range(1, 9)))
            seq = []
            for i in range(30):
                hs = list(range(1, 1 + rng.randint(1, 8))) if rng.random() < 0.5 else [10_000 + i]
                seq.append(r.route_hashes(hs, num_tokens=16 * len(hs), request_id=i).worker)
                if rng.random() < 0.5:
                    r.finish(i)
            outs.append(seq)
        assert outs[0] == outs[1], name


def test_kvroute_fleet_pressure_hand_computed():
    w = kvroute_cost.KVRouteWeights(fleet_pressure_cap=3.0)
    cands = [Candidate(state(0, prefill_requests=2)), Candidate(state(1, reported_waiting=4)),
             Candidate(state(2, reported_queue_tokens=10)), Candidate(state(3))]
    # queued requests: 2, 4, 1 (tokens only), 0 -> mean 7/4 (nobody caches anything: all count)
    assert kvroute_cost.fleet_busy(cands, w) == pytest.approx(7 / 4)
    cands[1].state.reported_waiting = 20  # mean 23/4 -> capped at 3
    assert kvroute_cost.fleet_busy(cands, w) == pytest.approx(3.0)
    assert kvroute_cost.fleet_busy([], w) == 0.0
    # the best-cached worker's own pile is left out: it must not raise the price of leaving it
    cands[1].total = cands[1].gpu = 4
    assert kvroute_cost.fleet_busy(cands, w) == pytest.approx(3 / 3)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_opt_int = st.one_of(st.none(), st.integers(0, 5000))


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 6000), st.integers(0, 5), st.integers(0, 300), _opt_int, _opt_int,
                               st.one_of(st.none(), st.floats(0, 1)), st.one_of(st.none(), st.integers(1, 500)),
                               st.integers(0, 8), st.integers(0, 4), st.integers(0, 4), st.integers(0, 4)),
                     min_size=1, max_size=8))
def test_kvroute_fast_path_equals_pure_functions(rows):
    w = kvroute_cost.KVRouteWeights()
    req = RouteRequest("r", num_tokens=300, num_blocks=18, block_size=16)
    cands = []
    for i, (pt, pr, db, rw, rq, ku, cap, g, h, d, p) in enumerate(rows):
        s = state(i, prefill_tokens=pt, prefill_requests=pr, decode_blocks=db, reported_waiting=rw,
                  reported_queue_tokens=rq, reported_kv_usage=ku, capacity_blocks=cap)
        cands.append(Candidate(s, total=g + h + d + p, gpu=g, host=h, disk=d, pending=p))
    ttfts, busy, best = kvroute_cost.ttfts_fast(req, cands, w)
    assert ttfts == pytest.approx([kvroute_cost.ttft(req, c, w) for c in cands], rel=1e-9, abs=1e-12)
    assert busy == pytest.approx(kvroute_cost.fleet_busy(cands, w))
    assert best == max(c.total for c in cands)
