"""Per-policy unit tests, the registry, the bench's JSON contract and golden figures on the bundled traces."""
from __future__ import annotations

import importlib.util
import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from kvroute.eviction import (
    POLICIES,
    EvictionError,
    PolicyUnavailableError,
    TieredCache,
    UnknownPolicyError,
    make_policy,
)
from kvroute.eviction.policies import adaptive as A
from kvroute.eviction.policies.adaptive import Adaptive
from kvroute.eviction.replay import (
    TraceError,
    capacity_blocks,
    load_trace,
    miss_breakdown,
    replay,
    unique_blocks,
)

HAVE_LCS = importlib.util.find_spec("libcachesim") is not None
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ registry
def test_registry_names_and_errors():
    assert {"lru", "lfu", "lrfu", "arc", "belady", "adaptive"} <= set(POLICIES)
    for name in ("lru", "lfu", "lrfu", "arc", "adaptive"):
        assert make_policy(name).name == name
    with pytest.raises(UnknownPolicyError):
        make_policy("mru")
    with pytest.raises(PolicyUnavailableError):
        make_policy("belady")


def test_kvroute_top_level_resolves_tieredcache():
    import kvroute

    assert kvroute.TieredCache is TieredCache


# ------------------------------------------------------------------ policies
def test_lfu_keeps_the_frequent_prompt():
    c = TieredCache(3, policy="lfu")
    for t in range(3):
        c.access([1], now=t)
    c.access([2], now=3)
    c.access([3], now=4)
    c.access([4], now=5)  # evicts 2 (count 1, oldest), not 1 (count 3)
    assert set(c.blocks()) == {1, 3, 4}


def test_lrfu_spans_lfu_and_lru():
    def survivors(lam):
        c = TieredCache(2, policy=lambda: make_policy("lrfu", lam=lam))
        for t in range(4):
            c.access([1], now=t)  # frequent but old
        c.access([2], now=100)
        c.access([3], now=101)
        return set(c.blocks())

    assert survivors(0.0) == {1, 3}  # LFU end: the frequent block stays
    assert survivors(1.0) == {2, 3}  # LRU end: the recent blocks stay
    with pytest.raises(ValueError):
        make_policy("lrfu", lam=-1)


def test_arc_ghost_hit_grows_recency_target():
    c = TieredCache(2, policy="arc")
    arc = c.policies[0]
    c.access([1], now=0)
    c.access([2], now=1)
    c.access([3], now=2)  # 1 goes to ghost B1
    assert arc.p == 0
    c.access([1], now=3)  # ghost hit in B1: recency pays
    assert arc.p > 0
    c.check_invariants()


def test_belady_evicts_farthest_and_skips_never_reused():
    future = [[1], [2], [3], [1], [2], [4], [1]]
    c = TieredCache(2, policy=lambda: make_policy("belady", future=future))
    hits = [c.access(k, now=i).hit for i, k in enumerate(future)]
    # 3 and 4 are never reused: refused; 1 and 2 stay and hit
    assert hits == [0, 0, 0, 1, 1, 0, 1]
    assert c.stats()["refused"] == 2


def test_adaptive_learns_continuation_by_turn_depth():
    # conversations: even ones continue for 4 turns, odd ones stop after the first
    pol = Adaptive(refresh_requests=8)
    c = TieredCache(10_000, policy=pol)
    now = 0.0
    base = 1000
    for conv in range(120):
        prefix = [0]
        turns = 4 if conv % 2 == 0 else 1
        for _ in range(turns):
            new = list(range(base, base + 3))
            base += 3
            keys = prefix + new
            c.access(keys, now)
            now += 5.0
            prefix = keys[:-1]  # the next turn reuses all but the (partial) tail
    cont = pol.continuation()
    assert cont["turn1/new0"] < cont["turn2/new0"]  # 50% of first turns vs all second turns continue
    d = pol.describe()
    assert d["name"] == "adaptive" and d["T"] > 0


def test_adaptive_prefers_likely_continuations_under_pressure():
    # same workload, small cache: adaptive must beat LRU clearly
    reqs = []
    now = 0.0
    base = 1000
    import random

    rng = random.Random(7)
    live = []  # (prefix, turns left)
    for _ in range(600):
        if live and rng.random() < 0.5:
            i = rng.randrange(len(live))
            prefix, left = live.pop(i)
        else:
            prefix, left = [0], (6 if rng.random() < 0.3 else 1)
        new = list(range(base, base + 4))
        base += 4
        keys = prefix + new
        reqs.append(keys)
        if left > 1:
            live.append((keys[:-1], left - 1))
        now += 1.0

    def run(name):
        c = TieredCache(60, policy=name)
        return sum(c.access(k, now=i).hit for i, k in enumerate(reqs)), c.stats()

    (ours, st), (lru, _) = run("adaptive"), run("lru")
    assert ours > lru
    assert st["refused"] > 0  # admission acts: blocks unlikely to be reused are not cached


def test_adaptive_hints_protect_hinted_blocks():
    c = TieredCache(4, policy="adaptive")
    c.access([1, 2], now=0)
    c.hint({1: 100.0, 2: 100.0})
    for i in range(10):
        c.access([10 + i], now=1 + i)
    assert 1 in c and 2 in c
    c.check_invariants()


def test_adaptive_depth_cost_and_overrides():
    p = make_policy("adaptive", depth_cost=0.5)
    assert p.w.depth_cost == 0.5
    with pytest.raises(TypeError):
        make_policy("adaptive", no_such_weight=1)
    for bad in ({"shrink": -1.0}, {"duel_decay": 0.0}, {"refresh_requests": 0}, {"horizon_factor": float("nan")},
                {"freq_edges": (4, 2)}, {"new_block_edges": (0, 8)}):
        with pytest.raises(EvictionError, match="invalid weights"):
            make_policy("adaptive", **bad)


# ------------------------------------------------------------- libcachesim
@pytest.mark.skipif(not HAVE_LCS, reason="libcachesim not installed")
def test_libcachesim_presence_lru_equals_kvroute_lru():
    from kvroute.eviction.policies.libcachesim_wrap import presence_replay

    reqs = load_trace("mooncake_conversation.jsonl", limit=1500)
    cap = capacity_blocks(0.05, unique_blocks(reqs))
    ours = replay(reqs, cap, "lru")["prefix_hit_ratio"]
    theirs = presence_replay(reqs, cap, "LRU")
    assert theirs["prefix"] == pytest.approx(ours, abs=1e-12)
    assert presence_replay(reqs, cap, "WTinyLFU")["prefix"] <= presence_replay(reqs, cap, "WTinyLFU")["present"]


@pytest.mark.skipif(not HAVE_LCS, reason="libcachesim not installed")
def test_libcachesim_follower_in_tiered_cache():
    reqs = load_trace("mooncake_conversation.jsonl", limit=300)
    for name in ("s3fifo", "sieve", "wtinylfu"):
        c = TieredCache(200, policy=name)
        for r in reqs:
            c.access(r.keys, r.ts)
        c.check_invariants()
        assert c.stats()["gpu_hits"] > 0
    with pytest.raises(PolicyUnavailableError):
        TieredCache(5, policy="s3fifo")


# ------------------------------------------------------------------ traces
def test_trace_errors(tmp_path):
    with pytest.raises(TraceError):
        load_trace(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "hash_ids": [1]}\n{"nope": 1}\n')
    with pytest.raises(TraceError):
        load_trace(str(bad))


def test_miss_breakdown_adds_up():
    reqs = load_trace("mooncake_conversation.jsonl", limit=800)
    cap = capacity_blocks(0.05, unique_blocks(reqs))
    for name in ("lru", "adaptive"):
        r = miss_breakdown(reqs, cap, name)
        assert r["prefix_hit_ratio"] + sum(r["misses"].values()) == pytest.approx(1.0)
        assert r["prefix_hit_ratio"] == pytest.approx(replay(reqs, cap, name)["prefix_hit_ratio"])


def test_miss_breakdown_counts_blocks_stored_on_the_host_as_admitted(monkeypatch):
    from kvroute.eviction.policies.lru import LRU
    from kvroute.eviction.replay import Request

    class GpuRefuses(LRU):
        tier_role = "gpu"  # the cache sets "host" on its host tier's instance

        def admit(self, key, depth, now):
            return self.tier_role == "host"

    monkeypatch.setitem(POLICIES, "gpu_refuses", GpuRefuses)
    # block 1 is refused by the GPU but stored on the host, then dropped from the host by block 2
    reqs = [Request(0.0, (1,)), Request(1.0, (2,)), Request(2.0, (1,))]
    r = miss_breakdown(reqs, 1, "gpu_refuses", host_blocks=1)
    assert r["misses"]["not admitted"] == 0 and r["misses"]["evicted <30s"] == pytest.approx(1 / 3)


def _bench(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["eviction_quality.py", *args])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "bench" / "eviction_quality.py"), run_name="__main__")
    return e.value.code


@pytest.mark.parametrize("host_ratio", ["4", "0"])
def test_bench_json_contract(capsys, monkeypatch, host_ratio):
    names = ["lru", "adaptive"] + [p for p in ("s3fifo",) if p in POLICIES]  # libcachesim's, counted apart
    assert _bench(monkeypatch, "--trace", "mooncake_synthetic.jsonl", "--capacity", "0.05,0.25", "--policies",
                  ",".join(names), "--host-ratio", host_ratio, "--limit", "300", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == set(names)
    for pol in out.values():
        assert set(pol) == {"0.05", "0.25"}
        for cell in pol.values():
            assert set(cell) == {"prefix_hit_ratio", "gpu_hit_ratio", "host_hit_ratio"}
            assert cell["prefix_hit_ratio"] == pytest.approx(cell["gpu_hit_ratio"] + cell["host_hit_ratio"])


@pytest.mark.skipif("wtinylfu" not in POLICIES, reason="libcachesim not installed")
def test_bench_policy_below_its_smallest_capacity_is_a_usage_error(capsys, monkeypatch):
    assert _bench(monkeypatch, "--policies", "wtinylfu", "--limit", "50", "--capacity", "0.01") == 2
    assert "needs at least" in capsys.readouterr().err


def test_bench_takes_a_generated_workload(capsys, monkeypatch):
    """--trace gen:NAME[:k=v] replays one of kvroute sim's generated workloads (the held-out checks)."""
    assert _bench(monkeypatch, "--trace", "gen:multi_turn_chat:n_sessions=300", "--capacity", "0.05",
                  "--policies", "lru,adaptive", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    # plumbing only: since the gap classes (issue 16) adaptive trails LRU on this small generated chat
    # workload at 5% (0.2868 against 0.2899; docs/eviction.md, "Issue 16"), a held-out regression on record
    lru, ours = out["lru"]["0.05"]["prefix_hit_ratio"], out["adaptive"]["0.05"]["prefix_hit_ratio"]
    assert 0.2 < lru < 0.4 and 0.2 < ours < 0.4 and lru != ours


def test_bench_adaptive_weights_reach_adaptive_only(capsys, monkeypatch):
    """--adaptive-weights overrides adaptive's Weights (what the weight scans in docs/eviction.md ran);
    other policies ignore it, and unknown or invalid weights are refused before any replay."""
    args = ["--trace", "mooncake_conversation.jsonl", "--limit", "1000", "--capacity", "0.05", "--json"]
    assert _bench(monkeypatch, *args, "--policies", "lru,adaptive") == 0
    plain = json.loads(capsys.readouterr().out)
    assert _bench(monkeypatch, *args, "--policies", "lru,adaptive",
                  "--adaptive-weights", '{"admit_ratio": 0, "gap_edges": []}') == 0
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["lru"] == plain["lru"] and tuned["adaptive"] != plain["adaptive"]
    reqs = load_trace("mooncake_conversation.jsonl", limit=1000)
    want = replay(reqs, capacity_blocks(0.05, unique_blocks(reqs)), "adaptive", params={
        "admit_ratio": 0, "gap_edges": ()})["prefix_hit_ratio"]
    assert tuned["adaptive"]["0.05"]["prefix_hit_ratio"] == want
    for bad in ('{"no_such_weight": 1}', '{"shrink": -1}', "[1]", "nope"):
        assert _bench(monkeypatch, *args, "--policies", "adaptive", "--adaptive-weights", bad) == 2
        assert "--adaptive-weights takes" in capsys.readouterr().err


def test_bench_no_gpu_admission_models_an_engine_pool(capsys, monkeypatch):
    """--no-gpu-admission: the GPU takes every block (a refusal still displaces a victim), as in
    ``replay(..., gpu_admission=False)``; LRU, which refuses nothing, is unchanged."""
    reqs = load_trace("mooncake_synthetic.jsonl", limit=1500)
    gpu = capacity_blocks(0.05, unique_blocks(reqs))
    engine = replay(reqs, gpu, "adaptive", gpu_admission=False)
    offline = replay(reqs, gpu, "adaptive")
    assert engine["stats"]["refused"] == 0 < offline["stats"]["refused"]
    assert engine["prefix_hit_ratio"] != offline["prefix_hit_ratio"]
    out = {}
    for flag in ([], ["--no-gpu-admission"]):
        assert _bench(monkeypatch, "--trace", "mooncake_synthetic.jsonl", "--capacity", "0.05", "--policies",
                      "lru,adaptive", "--limit", "1500", "--json", *flag) == 0
        out[bool(flag)] = json.loads(capsys.readouterr().out)
    assert out[True]["adaptive"]["0.05"]["prefix_hit_ratio"] == engine["prefix_hit_ratio"]
    assert out[False]["adaptive"]["0.05"]["prefix_hit_ratio"] == offline["prefix_hit_ratio"]
    assert out[True]["lru"] == out[False]["lru"]


@pytest.mark.parametrize("args", [["--capacity", "x"], ["--capacity", "0"], ["--trace", "/no/such.jsonl"],
                                  ["--host-ratio", "-1"], ["--trace", "gen:nope"]])
def test_bench_bad_input_is_a_usage_error(capsys, monkeypatch, args):
    assert _bench(monkeypatch, "--policies", "lru", "--limit", "50", *args) == 2
    assert "error:" in capsys.readouterr().err


# ------------------------------------------------------------------ golden
@pytest.fixture(scope="module")
def conversation():
    reqs = load_trace("mooncake_conversation.jsonl")
    return reqs, unique_blocks(reqs)


def test_golden_reference_figures(conversation):
    """The reference figures of the traces' README (shared/traces/README.md), full trace."""
    reqs, uniq = conversation
    assert len(reqs) == 12031 and uniq == 182790 and sum(len(r.keys) for r in reqs) == 288500

    def hit(share, name):
        return round(replay(reqs, capacity_blocks(share, uniq), name)["prefix_hit_ratio"], 3)

    assert hit(0.05, "lru") == 0.196
    assert replay(reqs, capacity_blocks(0.01, uniq), "lru")["prefix_hit_ratio"] == pytest.approx(0.053, abs=0.0006)
    assert hit(0.05, "lfu") == 0.127
    assert hit(0.05, "belady") == 0.366


def test_golden_adaptive_beats_baselines_on_a_prefix():
    reqs = load_trace("mooncake_conversation.jsonl", limit=3000)
    cap = capacity_blocks(0.05, unique_blocks(reqs))
    got = {n: replay(reqs, cap, n)["prefix_hit_ratio"] for n in ("lru", "arc", "adaptive")}
    assert got["adaptive"] > max(got["lru"], got["arc"])
    assert round(got["lru"], 4) == 0.0585  # pinned: block-level LRU on the first 3,000 requests


# ------------------------------------------------------------------ duel
def test_adaptive_host_duel_shadows_replay_whole_cache_standalone():
    """The host tier's shadows are standalone caches of GPU + host blocks: with no forgetting,
    their scores are exactly the hits of learned/LRU/ARC replays at that size, and the leader
    follows the rule (it changes only to an expert that beats it by the margin, significantly)."""
    reqs = load_trace("mooncake_conversation.jsonl", limit=400)
    gpu, host = 60, 240
    fac = lambda: Adaptive(duel=True, duel_decay=1.0, duel_margin=0.002, duel_z=0.5)  # noqa: E731
    c = TieredCache(gpu, host, fac, host_policy=fac)
    g, h = c.policies
    assert h._shadows is not None and g._verdict is h and g._shadows is None
    for r in reqs:
        c.access(r.keys, r.ts)
        best = max(range(3), key=h.scores.__getitem__)
        assert not (h.scores[best] > h.scores[h.leader] * (1 + h.w.duel_margin)
                    and h._surplus[best] > h.w.duel_z * math.sqrt(h._surplus_sq[best]))
        c.check_invariants()
        h._votes.check_invariants()
        g._votes.check_invariants()
    want = [replay(reqs, gpu + host, p)["stats"]["gpu_hits"] for p in ("lru", "arc")]
    assert h.scores[1:] == want
    alone = TieredCache(gpu + host, policy=Adaptive(duel=False))
    for r in reqs:
        alone.access(r.keys, r.ts)
    assert h.scores[0] == alone.stats()["gpu_hits"]
    assert h.duel_stats["requests"] == len(reqs)
    # a GPU-only cache (and an engine's tier, which sets no role) runs no duel
    assert TieredCache(60, policy="adaptive").policies[0]._shadows is None


class _StubShadow:
    """Stands in for a ShadowCache in the duel: each request hits as the script says."""

    def __init__(self, hits):
        self.hits = iter(hits)

    def start_request(self, keys, now):
        return type("T", (), {"hit": next(self.hits)})()

    def finish_request(self, t, now):
        pass


def _scripted_duel(script, **w):
    """The host tier's duel fed scripted per-request hits (one row per request: learned, LRU, ARC);
    returns the leader after each request."""
    h = Adaptive(**w)
    h.tier_role = "host"
    h.bind(8)
    h._shadows = tuple(_StubShadow([row[i] for row in script]) for i in range(3))
    out = []
    for n in range(len(script)):
        h._duel([n], float(n))
        out.append(h.leader)
    return out


def test_duel_ignores_a_lucky_lead_and_follows_a_significant_one():
    """A lead far above the margin but from one request is not significant (surplus 10, sd 10); a
    steady one-block lead is (surplus n > 2 sqrt(n) from n = 5 on); with duel_z=0 the margin alone
    decides.  After a switch the test starts over against the new leader."""
    lucky = [(0, 10, 0)] + [(5, 5, 5)] * 20
    assert set(_scripted_duel(lucky)) == {0}
    assert _scripted_duel(lucky, duel_z=0.0)[0] == 1
    steady = [(10, 10, 11)] * 10
    assert _scripted_duel(steady) == [0, 0, 0, 0, 2, 2, 2, 2, 2, 2]
    # the surplus counts since the last switch (request 4): the learned expert trails by 5 after request
    # 9, and with +2 a request it is significantly ahead after nine more (13 > 2 sqrt(41)), not eight
    # (11 < 2 sqrt(37)), though its score leads from the sixth on
    back = steady + [(12, 10, 10)] * 10
    lead = _scripted_duel(back, duel_margin=0.0, duel_decay=1.0)
    assert lead[9] == 2 and lead.index(0, 10) == 18 and lead[-1] == 0


class _Frozen(Adaptive):
    """A learned expert gone wrong: once full, it admits nothing (its shadow, built from ``type(self)``,
    does the same), so it keeps the first blocks it saw for ever."""

    def admit(self, key, depth, now):
        return len(self._res) < self.capacity if self._votes is None else super().admit(key, depth, now)


def test_duel_switches_when_the_learned_expert_is_clearly_worse():
    """A learned expert that stops admitting loses significantly to LRU and ARC: the cache follows
    one of them, and hits more than with the duel off."""
    # two phases of five hot 8-block prefixes each, every request with two blocks of its own
    reqs = [[1000 * (i // 300) + 10 * (i % 5) + j for j in range(8)] + [10**6 + 2 * i, 10**6 + 2 * i + 1]
            for i in range(600)]
    gpu, host = 10, 40
    c = TieredCache(gpu, host, lambda: _Frozen(duel=True), host_policy=lambda: _Frozen(duel=True))
    off = TieredCache(gpu, host, lambda: _Frozen(duel=False), host_policy=lambda: _Frozen(duel=False))
    for i, keys in enumerate(reqs):
        c.access(keys, float(i))
        off.access(keys, float(i))
    assert c.policies[1].leader != 0
    on, no = c.stats(), off.stats()
    assert on["gpu_hits"] + on["host_hits"] > no["gpu_hits"] + no["host_hits"]


@pytest.mark.parametrize("leader", [0, 1, 2])
def test_two_tiers_hold_what_the_leading_shadow_holds(leader):
    """With the leader pinned, GPU + host together hit exactly as often as the leader's shadow (one
    cache of their summed size run by that expert): both tiers drop first what the shadow dropped."""
    reqs = load_trace("mooncake_conversation.jsonl", limit=1500)
    gpu, host = 500, 2000
    fac = lambda: Adaptive(duel=True, duel_margin=1e9)  # noqa: E731  (no switch by itself)
    c = TieredCache(gpu, host, fac, host_policy=fac)
    g, h = c.policies
    h._set_leader(leader)
    for r in reqs:
        c.access(r.keys, r.ts)
    st = c.stats()
    shadow = h._shadows[leader].stats()
    assert st["gpu_hits"] + st["host_hits"] == pytest.approx(shadow["gpu_hits"], rel=0.002)
    # and the expert matters: the learned shadow hits more than LRU's on this trace
    assert h._shadows[0].stats()["gpu_hits"] > h._shadows[1].stats()["gpu_hits"]
    c.check_invariants()


def test_clear_starts_the_duel_shadows_over_too():
    """An engine's prefix-cache reset empties the shadows as well (they model this cache), so after it
    GPU + host again hit as often as the leader's shadow; the learned state and the scores stay."""
    reqs = load_trace("mooncake_conversation.jsonl", limit=1200)
    fac = lambda: Adaptive(duel=True, duel_margin=1e9)  # noqa: E731
    c = TieredCache(300, 1200, fac, host_policy=fac)
    g, h = c.policies
    for r in reqs[:600]:
        c.access(r.keys, r.ts)
    scores, learned = list(h.scores), len(h._meta)
    c.clear(reqs[600].ts)
    assert all(len(sh) == 0 for sh in h._shadows) and len(h._votes) == len(g._votes) == 0
    assert h.scores == scores and len(h._meta) == learned
    # on its own (candidates still there), the hook recomputes both tiers' votes: every shadow dropped all
    other = TieredCache(300, 1200, fac, host_policy=fac)
    for r in reqs[:300]:
        other.access(r.keys, r.ts)
    og, oh = other.policies
    oh.on_clear()
    for v in (og._votes, oh._votes):
        v.check_invariants()
        assert len(v) and all(m == 0b111 for m in v._mask.values())
    c.check_invariants()
    before, shadow_before = c.stats(), h._shadows[0].stats()["gpu_hits"]
    for r in reqs[600:]:
        c.access(r.keys, r.ts)
        h._votes.check_invariants()
        g._votes.check_invariants()
    st = c.stats()
    got = st["gpu_hits"] + st["host_hits"] - before["gpu_hits"] - before["host_hits"]
    assert got > 0 and got == pytest.approx(h._shadows[0].stats()["gpu_hits"] - shadow_before, rel=0.002)
    c.check_invariants()


def test_hints_leave_the_duel_order_alone():
    """Regression: hint() re-filed a candidate by dropping and re-adding it, which moved it to the back
    of its Votes level (protecting it, even when its hint was withdrawn) and re-filed the experts."""
    reqs = load_trace("mooncake_conversation.jsonl", limit=400)
    c = TieredCache(60, 240, lambda: Adaptive(duel=True), host_policy=lambda: Adaptive(duel=True))
    g, h = c.policies
    for r in reqs:
        c.access(r.keys, r.ts)
    order = lambda p: [list(lv) for lv in p._votes._levels]  # noqa: E731
    before = [order(p) for p in (g, h)]
    cands = [k for k in h._cand][:5] + [k for k in g._cand][:5]
    assert any(before[0]) and any(before[1])
    for p in (g, h):
        p.hint({k: 50.0 for k in cands})
        p.hint({})
    assert [order(p) for p in (g, h)] == before
    for p in (g, h):
        p._votes.check_invariants()
    c.check_invariants()


def _small_two_tier():
    """A 3 + 12 block two-tier adaptive cache after twelve two-block requests."""
    c = TieredCache(3, 12, lambda: Adaptive(duel=True), host_policy=lambda: Adaptive(duel=True))
    for i in range(12):
        c.access([100 + i, 200 + i], now=float(i))
    return c, *c.policies


def test_adaptive_gpu_follows_host_verdict():
    c, g, h = _small_two_tier()
    for lead in (1, 2, 0):
        h._set_leader(lead)
        assert g._votes.leader == lead and h._votes.leader == lead
        sh = h._shadows[lead]
        for tier in (g, h):
            v = tier.victim()
            if tier._votes.victim() is not None:  # a candidate the leading shadow dropped goes first
                assert v == tier._votes.victim()
                if any(k not in sh for k in tier._votes._mask):
                    assert v not in sh
            elif lead:
                assert v == tier._experts[lead].victim()
            else:
                assert v == tier._learned_victim()
        # admission when full: what the leading shadow holds
        assert g.admit(100 + 11, 1, 20.0) == (100 + 11 in sh or len(g._res) < g.capacity)
        assert not h.admit(987654, 0, 20.0) or len(h._res) < h.capacity
    for i in range(12, 40):  # the experts and votes stay in step with the real candidates
        h._set_leader(i % 3)
        c.access([100 + i, 200 + i], now=float(i))
        c.check_invariants()
        g._votes.check_invariants()
        h._votes.check_invariants()
        assert g._experts[1].candidates() == g.candidates() == len(g._votes)
    assert not make_policy("adaptive", duel=False)._experts



def test_adaptive_candidate_heaps_stay_bounded_in_two_tiers():
    """Regression: in a two-tier cache victims come from Votes first, so stale heap entries (re-filed
    on access, pinned, removed) were never popped and the host tier's heaps grew with every request
    (11,650 entries for 17 candidates after 2,000 requests)."""
    reqs = load_trace("mooncake_conversation.jsonl", limit=2000)
    c = TieredCache(60, 240, lambda: Adaptive(duel=True), host_policy=lambda: Adaptive(duel=True))
    for r in reqs:
        c.access(r.keys, r.ts)
    for p in c.policies:
        entries = sum(map(len, p._heaps)) + len(p._hint_heap)
        live = sum(1 for h in (*p._heaps, p._hint_heap) for e in h if p._cand.get(e[2], (0, -1))[1] == e[1])
        if p._dh is not None:  # the compiled heaps hold the classes >= 0 (and compact the same way)
            assert p._dh.entries() <= 4 * p._dh.live() + 1024
            live += p._dh.live()
        assert entries <= 4 * p.candidates() + 1025 + len(p._heaps), (p.tier_role, entries, p.candidates())
        assert live == p.candidates()  # compaction keeps every live entry


def test_gpu_tier_describe_reports_the_duel_it_follows():
    """Regression: replay reports policies[0].describe(), the GPU tier, whose own leader and scores
    never move (it follows the host tier's duel): it said "learned" with zero scores while following ARC."""
    c = TieredCache(3, 12, lambda: Adaptive(duel=True), host_policy=lambda: Adaptive(duel=True))
    g, h = c.policies
    for i in range(12):
        c.access([100, 200 + i], now=float(i))  # block 100 is hit from the second request on
    h._set_leader(2)
    d = g.describe()
    assert d["leader"] == h.describe()["leader"] == "arc"
    assert d["scores"] == [round(x, 2) for x in h.scores] and max(d["scores"]) > 0
    assert d["duel"]["requests"] == 12
    assert make_policy("adaptive").describe()["leader"] == "learned"


def test_tiers_drop_first_what_the_leading_shadow_dropped():
    """The follow rule itself, on both tiers and every leader (in the test above the shadows and the
    tiers agree, so Votes never has a victim there): once the leading shadow drops one of a tier's
    candidates, that candidate is the tier's next victim, whatever the tier's own ordering says."""
    c, g, h = _small_two_tier()
    for lead in (1, 2, 0):
        h._set_leader(lead)
        sh = h._shadows[lead]
        for tier in (g, h):
            k = next(k for k in tier._votes._mask if k in sh and sh._links.is_leaf(k) and k not in sh._pins)
            sh._drop_subtree(k)
            tier._votes.check_invariants()
            assert tier.victim() == k

# ------------------------------------------------------------------ learned survival estimates
def test_at_risk_counts_open_lifetimes_only_up_to_their_age():
    """Kaplan-Meier risk sets: lifetimes still open at a young age do not count against the reuse
    hazard of older ages (a naive reuses/accesses ratio would halve it here)."""
    from kvroute.eviction.policies import adaptive as A

    n = A._NBINS
    hits = [0.0] * n
    gone = [0.0] * n
    hits[12] = 5.0  # five lifetimes reused at age bin 12
    now = 1000.0
    young = now - A._MIDS[5]  # five more started recently: open, at age bin 5
    open_ = {int(young // A._SLOT): 5}
    risk = A._at_risk(hits, gone, open_, now)
    b = A._bin(now - (int(young // A._SLOT) + 0.5) * A._SLOT)
    assert risk[0] == 10.0 and risk[b] == 5.0 + 2.5 and risk[b + 1] == 5.0 and risk[12] == 5.0
    lam = A._shrunk(hits, risk, [0.0] * n, 0.0)
    assert lam[12] == 1.0 and lam[0] == 0.0
    gone[20] = 5.0  # five that left the ghost unreused at bin 20: at risk through bin 20
    assert A._at_risk(hits, gone, {}, now)[12] == 10.0


def test_shrinkage_follows_the_prior_where_data_is_thin():
    from kvroute.eviction.policies import adaptive as A

    n = A._NBINS
    prior = [0.1] * n
    hits, risk = [0.0] * n, [0.0] * n
    hits[3], risk[3] = 900.0, 1000.0
    lam = A._shrunk(hits, risk, prior, 20.0)
    assert lam[0] == pytest.approx(0.1)  # no data: the prior
    assert lam[3] == pytest.approx((900 + 2) / 1020)  # much data: close to its own 0.9


def test_density_by_hand():
    from kvroute.eviction.policies import adaptive as A

    n = A._NBINS
    lam = [0.0] * n
    assert A._density(lam, 60.0) == [0.0] * n
    j = 10  # every lifetime is reused in bin j (mid m): from age 0, one hit per m seconds of space
    lam[j] = 1.0
    m = A._MIDS[j]
    hd = A._density(lam, 10 * m)
    assert hd[0] == pytest.approx(1.0 / m)
    assert hd[j + 1] == 0.0  # past the reuse: nothing more to expect
    # a horizon shorter than the reuse: no hit within it, density 0
    assert A._density(lam, m / 4)[0] == 0.0


def test_ceiling_bench_orders_predictors_by_quality(capsys, monkeypatch):
    """bench/eviction_ceiling.py: the same learned policy gains with the quality of its continuation
    classes (perfect > sharp noisy > blurred noisy), and the AUCs it reports follow the noise."""
    monkeypatch.setattr(sys, "argv", ["eviction_ceiling.py", "--limit", "2000", "--capacity", "0.05",
                                      "--sigmas", "0.25,3", "--json"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "bench" / "eviction_ceiling.py"), run_name="__main__")
    assert e.value.code == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in out["rows"]}
    hit = {n: r["prefix_hit_ratio"] for n, r in rows.items()}
    assert hit["belady"] >= hit["oracle (continued)"] > hit["noisy sigma=0.25"] > hit["noisy sigma=3"]
    assert hit["oracle (continued)"] > hit["adaptive"] > hit["lru"]
    assert rows["noisy sigma=0.25"]["auc"] > 0.95 and rows["noisy sigma=3"]["auc"] < 0.7
    assert 0 < out["continued_share"] < 1 and out["blocks"] > 0


def _open_lifetimes(p):
    return sum(sum(d.values()) for d in p._open)


def test_extend_adds_a_response_to_its_request():
    """An engine's response blocks (hashed as they are generated) join their request: used once in its
    class, the prompt's old tail stops being the tail, and a next turn counts their reuse as hits and
    finds its turn depth through them.  Without extend they would be strangers to the policy."""
    def turn(extend):
        p = Adaptive()
        p.bind(100)
        p.begin([1, 2, 3], 0.0)
        nf = p._nf
        tail_cls = p._meta[3][1]
        assert tail_cls // nf % 2 == 1
        if extend:
            p.extend([1, 2, 3, 4, 5], 3, 1.0)
            assert p._meta[3][1] == tail_cls - nf  # same request class, no longer the tail
            assert p._meta[4][1] == tail_cls - nf and p._meta[5][1] == tail_cls and p._meta[5][2] == 1
            assert p._endof[5] == (1, 1.0) and p._succ[3] == (4,)
            p.extend([1, 2, 3, 4, 5], 0, 1.0)  # no-ops
            p.extend([1, 2, 3, 4, 5], 5, 1.0)
        assert _open_lifetimes(p) == len(p._meta)
        before = sum(map(sum, p._hits))
        p.begin([1, 2, 3, 4, 5, 6, 7], 10.0)  # the next turn
        assert _open_lifetimes(p) == len(p._meta)
        return sum(map(sum, p._hits)) - before, p._td
    assert turn(True) == (5, 2)   # prompt and response reused, second turn
    assert turn(False) == (3, 2)  # only the prompt counts as reused


def test_extend_after_an_engine_stored_the_response_counts_a_first_use():
    p = Adaptive()
    p.bind(100)
    p.begin([1, 2, 3], 0.0)
    p.on_insert(4, 3, 0.5)  # the engine stored the response block before the request finished
    assert p._meta[4][2] == 0  # provisional
    p.extend([1, 2, 3, 4], 3, 1.0)
    assert p._meta[4][2] == 1 and sum(map(sum, p._hits)) == sum(h[0] for h in p._hits)  # no reuse recorded
    assert _open_lifetimes(p) == len(p._meta)


def test_negative_ages_fall_in_the_first_bin():
    """A lifetime opened in the current time slot before its midpoint, or a clock that went backwards,
    has a negative age: it is age 0, not the oldest bin (bisect would give -1, the last bin)."""
    from kvroute.eviction.policies import adaptive as A

    assert A._bin(-5.0) == 0 and A._bin(0.0) == 0 and A._bin(1e9) == A._NBINS - 1
    now = 250 * A._SLOT + 0.5  # ten lifetimes opened 0.5 s ago, in the slot starting at 250 * _SLOT
    risk = A._at_risk([0.0] * A._NBINS, [0.0] * A._NBINS, {250: 10}, now)  # slot midpoint is in the future
    assert risk[-1] == 0.0 and risk[0] == 5.0  # open in bin 0: half counts there, none in the oldest
    p = Adaptive()
    p.begin([1, 2], 10.0)
    p.begin([1, 2], 4.0)  # out-of-order clock: a reuse at age 0
    assert sum(p._hits[c][-1] for c in range(p.nclasses)) == 0.0


# ------------------------------------------------------------- speed paths (issue 16)
def test_density_table_equals_the_scalar_reference_exactly():
    """The numpy refresh computes every class's density table with the scalar reference's arithmetic."""
    import random

    rng = random.Random(7)
    n = A._NBINS
    lam = [[rng.random() ** 3 for _ in range(n)] for _ in range(9)] + [[0.0] * n, [1.0] * n]
    for T in (0.5, 7.0, 60.0, 3600.0, 1e5):
        got = A._density_table(np.array(lam), T).tolist()
        assert got == [A._density(row, T) for row in lam]


def test_refresh_equals_the_scalar_hazards():
    """_refresh's vectorised hazards give the tables the scalar _at_risk/_shrunk/_density give."""
    reqs = load_trace("mooncake_conversation.jsonl", limit=600)
    p = Adaptive()
    c = TieredCache(200, policy=p)
    for r in reqs:
        c.access(r.keys, r.ts)
    now = reqs[-1].ts
    p._refresh(now)
    k, T = p.w.shrink, p.T * p.w.horizon_factor
    risk = [A._at_risk(p._hits[c], p._gone[c], p._open[c], now) for c in range(p.nclasses)]
    allc = range(p.nclasses)
    ah = [sum(p._hits[c][j] for c in allc) for j in range(A._NBINS)]
    ar = [sum(risk[c][j] for c in allc) for j in range(A._NBINS)]
    top = [ah[j] / ar[j] if ar[j] > 0 else 0.0 for j in range(A._NBINS)]
    for cs in p._groups:
        gh = [sum(p._hits[c][j] for c in cs) for j in range(A._NBINS)]
        gr = [sum(risk[c][j] for c in cs) for j in range(A._NBINS)]
        glam = A._shrunk(gh, gr, top, k)
        for c in cs:
            assert list(p._hd[c]) == A._density(A._shrunk(p._hits[c], risk[c], glam, k), T), c


@pytest.mark.parametrize("host", [0, 4])
def test_victim_snapshot_equals_a_full_scan(host):
    """Every learned victim the snapshot heap picks is the one a scan of all class heads picks."""
    checked = [0]

    class Checked(Adaptive):
        def victim(self):  # no duel: the learned victim (compiled heaps or Python snapshot)
            ref = self._victim_by_scan()
            v = super().victim()
            assert v == ref
            checked[0] += 1
            return v

    reqs = load_trace("mooncake_conversation.jsonl", limit=700)
    c = TieredCache(150, 150 * host, Checked, host_policy=Checked)
    for i, r in enumerate(reqs):
        c.access(r.keys, r.ts)
        if i % 50 == 0:
            c.hint({r.keys[0]: 0.5})
    assert checked[0] > 1000


def test_two_tiers_without_duel_drop_the_lower_density_block():
    """Host tier, no duel, full: a demoted block is taken only when it ranks above the host's own
    victim; both tiers read one learned state (the GPU tier's)."""
    reqs = load_trace("mooncake_conversation.jsonl", limit=500)
    c = TieredCache(60, 240, "adaptive", host_policy="adaptive")
    g, h = c.policies
    assert h._upper is g and g._lower is h and h._meta is g._meta and h._shadows is None
    asked = []
    orig = h._union_admit

    def spy(key):
        ok = orig(key)
        e = h._peek()
        m = h._meta.get(key)
        if e is not None and m is not None and key not in h._hint:
            v = h._density(key, m[1], m[0])
            lv = math.floor(math.log2(v) / h.w.density_quantum) if v > 0 else -math.inf
            assert ok == ((lv, m[0]) > (e[0], e[1]))
            asked.append(ok)
        return ok

    h._union_admit = spy
    for r in reqs:
        c.access(r.keys, r.ts)
        c.check_invariants()
        assert h._hd is g._hd and h.T == g.T
    assert True in asked and False in asked


# ------------------------------------------------------- request info and client hints (issue 16)
def test_request_info_reaches_both_tiers_before_begin():
    from kvroute.eviction import EvictionPolicy, RequestInfo
    from kvroute.eviction.policies.lru import LRU

    calls = []

    class Rec(LRU):
        def request_info(self, info):
            calls.append(("info", id(self), info))

        def begin(self, keys, now):
            calls.append(("begin", id(self), tuple(keys)))

    c = TieredCache(4, 8, Rec, host_policy=Rec)
    info = RequestInfo(output_tokens=7, session="s1", expected_return_s=3.0)
    c.access([1, 2], 0.0, info)
    g, h = (id(p) for p in c.policies)
    assert calls == [("info", g, info), ("info", h, info), ("begin", g, (1, 2)), ("begin", h, (1, 2))]
    calls.clear()
    c.access([1, 2, 3], 1.0)  # no info: no call
    assert [k for k, *_ in calls] == ["begin", "begin"]
    assert EvictionPolicy().request_info(info) is None  # the default ignores it


def test_sessions_and_client_hints_from_prefixes():
    from kvroute.eviction.replay import Request, client_hints, sessions

    reqs = [Request(0.0, (1, 2, 3), 10),       # session 0
            Request(1.0, (1, 9), 5),           # shares block 1 only: a new session (1)
            Request(2.0, (1, 2, 3, 4, 5), 20),  # runs through session 0's last blocks
            Request(5.0, (1, 9, 8), 1),        # session 1 again
            Request(9.0, (1, 2, 3, 4, 5, 6), 2)]
    assert sessions(reqs) == [0, 1, 0, 1, 0]
    h = client_hints(reqs)
    assert [x.session for x in h] == [0, 1, 0, 1, 0]
    assert [x.expected_return_s for x in h] == [2.0, 4.0, 7.0, math.inf, math.inf]
    assert [x.output_tokens for x in h] == [10, 5, 20, 1, 2]


def test_gz_traces_load(tmp_path):
    import gzip

    p = tmp_path / "t.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write('{"timestamp": 1000, "input_length": 64, "output_length": 3, "hash_ids": [5, 6]}\n')
    r = load_trace(str(p))
    assert [(x.ts, x.keys, x.output_length) for x in r] == [(1.0, (5, 6), 3)]


def test_gap_classes_split_requests_by_the_time_since_the_request_they_extend():
    p = Adaptive(gap_edges=(16, 64))
    p.bind(100)
    p.begin([1, 2, 3], 0.0)
    assert p._gap is None
    p.begin([1, 2, 3, 4], 10.0)  # extends the first prompt after 10 s: gap class 0
    c10 = p._meta[4][1]
    p.begin([1, 2, 3, 4, 5], 110.0)  # after 100 s: gap class 2
    assert p._gap == 100.0
    c100 = p._meta[5][1]
    assert c10 != c100
    nf, ng = p._nf, p._ng
    assert ng == 3 and (c100 // (2 * nf)) % ng == 2 and (c10 // (2 * nf)) % ng == 0
    with pytest.raises(EvictionError):
        Adaptive(gap_edges=(64, 16))


def test_return_hints_keep_the_session_that_returns_first():
    """Client hints: of two sessions that do not both fit, the one expected back later goes first."""
    from kvroute.eviction import RequestInfo

    for soon, late in ((10.0, 1000.0), (1000.0, 10.0)):
        c = TieredCache(8, policy=Adaptive(admit_ratio=0.0))
        a, b = [1, 2, 3, 4], [11, 12, 13, 14]
        c.access(a, 0.0, RequestInfo(expected_return_s=soon))
        c.access(b, 1.0, RequestInfo(expected_return_s=late))
        c.access([21, 22, 23, 24], 2.0, RequestInfo(expected_return_s=math.inf))  # needs 4 blocks
        kept = a if soon < late else b
        gone = b if soon < late else a
        assert all(k in c for k in kept) and not any(k in c for k in gone), c.blocks()
        c.check_invariants()


def test_bench_client_hints_and_timing(capsys, monkeypatch):
    assert _bench(monkeypatch, "--trace", "mooncake_synthetic.jsonl", "--capacity", "0.05", "--policies",
                  "lru,adaptive", "--limit", "200", "--json", "--timing", "--client-hints", "--no-progress") == 0
    out = json.loads(capsys.readouterr().out)
    t = out["_timing_us_per_block"]
    assert set(t) == {"lru", "adaptive"} and all(v > 0 for v in t.values())
