"""TieredCache: unit tests of tiers, pins, leaves-first eviction, events and the index follower."""
from __future__ import annotations

import pytest

from kvroute.eviction import EvictionError, TieredCache, UnknownPolicyError, index_follower
from kvroute.kvindex import KVIndex, Tier


def index_state(ix: KVIndex, w) -> dict:
    return {k: min(ts) for k, ts in ix.blocks_of(w).items()}


def test_lookup_has_no_side_effects_and_hits_touch():
    c = TieredCache(4)
    assert c.lookup([1, 2, 3]) == (0, 0)
    t = c.access([1, 2, 3])
    assert (t.gpu_hit, t.inserted) == (0, 3)
    assert c.lookup([1, 2, 9]) == (2, 0)
    assert c.stats()["requests"] == 1
    t = c.access([1, 2, 9])
    assert (t.gpu_hit, t.inserted) == (2, 1)
    c.check_invariants()


def test_lru_evicts_tail_of_oldest_prompt_first():
    c = TieredCache(4)
    c.access([1, 2, 3], now=0)
    c.access([10], now=1)
    c.access([20], now=2)  # full: evicts 3 (tail of the oldest prompt), not 1
    assert set(c.blocks()) == {1, 2, 10, 20}
    c.access([30], now=3)
    assert set(c.blocks()) == {1, 10, 20, 30}
    c.check_invariants()


def test_pinned_blocks_are_not_evicted():
    c = TieredCache(3)
    t = c.start_request([1, 2, 3], now=0)
    t2 = c.start_request([7, 8], now=1)
    assert t2.inserted == 0 and c.stats()["no_room"] == 1
    c.finish_request(t, now=2)
    c.finish_request(t2, now=2)
    with pytest.raises(EvictionError):
        c.finish_request(t, now=3)
    c.check_invariants()


def test_demote_to_host_and_promote_back():
    c = TieredCache(2, 2)
    c.access([1, 2], now=0)
    c.access([5, 6], now=1)  # 2 then 1 demoted
    assert c.blocks() == {1: Tier.HOST, 2: Tier.HOST, 5: Tier.GPU, 6: Tier.GPU}
    assert c.lookup([1, 2]) == (0, 2)
    t = c.access([1, 2], now=2)
    assert (t.gpu_hit, t.host_hit, t.promoted) == (0, 2, 2)
    assert c.tier_of(1) == Tier.GPU and c.tier_of(2) == Tier.GPU
    c.check_invariants()


def test_key_under_another_parent_is_not_a_hit():
    c = TieredCache(8)
    c.access([1, 2])
    assert c.lookup([3, 2]) == (0, 0)
    t = c.access([3, 2])
    assert t.inserted == 1 and c.stats()["conflicts"] == 1
    c.check_invariants()


def test_index_follows_cache_exactly():
    ix = KVIndex()
    c = TieredCache(3, 3, on_event=index_follower(ix, "w"))
    for i, keys in enumerate([[1, 2, 3], [1, 2, 4], [5, 6], [7, 8, 9], [1, 2, 3, 10], [5, 6]]):
        c.access(keys, now=i)
        assert index_state(ix, "w") == c.blocks()
        ix.check_invariants()
    c.clear()
    assert index_state(ix, "w") == {}


def test_ticket_from_before_clear_releases_nothing():
    c = TieredCache(3, 0)
    old = c.start_request([1, 2, 3], 0)
    c.clear(1)
    new = c.start_request([1, 2, 3], 2)  # the same keys, pinned again by a live request
    c.finish_request(old, 3)  # was a KeyError, or unpinned the live request's blocks
    assert [c.pinned(k) for k in (1, 2, 3)] == [1, 1, 1]
    c.check_invariants()
    assert c.access([4], 4).inserted == 0  # full of pins: nothing evicted
    c.finish_request(new, 5)
    assert c.access([4], 6).inserted == 1
    c.check_invariants()


def test_another_caches_ticket_is_refused():
    a, b = TieredCache(3, 0), TieredCache(3, 0)
    t = a.start_request([1, 2], 0)
    with pytest.raises(EvictionError, match="another cache"):
        b.finish_request(t, 1)  # was a KeyError (or unpinned b's blocks when b held the same keys)
    a.finish_request(t, 1)
    a.check_invariants()


def test_unknown_policy_and_bad_capacity():
    with pytest.raises(UnknownPolicyError):
        TieredCache(4, policy="nope")
    with pytest.raises(EvictionError):
        TieredCache(-1)


def test_gpu_admission_flag_must_be_a_bool():
    with pytest.raises(EvictionError):
        TieredCache(4, gpu_admission="no")


def test_gpu_refusal_stores_straight_to_host():
    from kvroute.eviction.policies.lru import LRU

    class RefuseDeep(LRU):
        def admit(self, key, depth, now):
            return depth < 2

    ix = KVIndex()
    c = TieredCache(4, 2, RefuseDeep(), host_policy="lru", on_event=index_follower(ix, "w"))
    t = c.access([1, 2, 3, 4, 5], now=0)
    assert (t.inserted, t.stored_host, t.uncached) == (2, 2, 1)  # host holds 2 blocks
    assert c.lookup([1, 2, 3, 4, 5]) == (2, 2)
    assert c.blocks() == {1: Tier.GPU, 2: Tier.GPU, 3: Tier.HOST, 4: Tier.HOST}
    assert index_state(ix, "w") == c.blocks()
    t = c.access([1, 2, 3, 4], now=1)
    assert (t.gpu_hit, t.host_hit, t.promoted) == (2, 2, 2)
    c.check_invariants()
    no_host = TieredCache(4, 0, RefuseDeep())
    t = no_host.access([1, 2, 3, 4, 5], now=0)
    assert (t.inserted, t.stored_host, t.uncached) == (2, 0, 3)
    # an engine's GPU pool cannot refuse: the policy is not asked, every block it has room for goes in
    engine = TieredCache(4, 2, RefuseDeep(), host_policy="lru", gpu_admission=False)
    t = engine.access([1, 2, 3, 4, 5], now=0)
    assert (t.inserted, t.stored_host, t.uncached) == (4, 0, 1) and engine.stats()["refused"] == 0
    engine.check_invariants()
