"""kvroute.adapters.vllm_plugin.PolicyFreeQueue without vLLM: a small model of vLLM's
BlockPool drives it exactly as vLLM 0.32 does (popleft_n + evict on allocation,
remove + touch on a hit, cache_full_blocks, free in reverse with uncached blocks
prepended and cached ones appended).  The real-engine check is in
``test_vllm_gpu_eviction.py``."""

from __future__ import annotations

import importlib.util

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.adapters.vllm_plugin import ENV_ADMISSION, ENV_POLICY, PolicyFreeQueue, UnsupportedVLLMError, install, register
from kvroute.eviction import make_policy


class Block:
    __slots__ = ("block_id", "block_hash", "ref_cnt", "prev_free_block", "next_free_block")

    def __init__(self, i: int) -> None:
        self.block_id, self.block_hash, self.ref_cnt = i, None, 0
        self.prev_free_block = self.next_free_block = None


class Pool:
    """What vLLM's BlockPool + KVCacheManager do with the free queue, for one request at a time."""

    def __init__(self, n: int, policy: str = "lru", **kw) -> None:
        self.blocks = [Block(i) for i in range(n)]
        self.q = PolicyFreeQueue(self.blocks, make_policy(policy, **kw), n - 1)
        self.null = self.q.popleft()  # vLLM's null block
        self.cached: dict[str, Block] = {}  # hash -> primary block
        self.evicted: list[str] = []
        self.rid = 0

    def run(self, keys: list[str], now: float, prompt: int | None = None) -> int:
        """Serve one prompt of len(keys) full blocks; returns vLLM's hit in blocks.  With ``prompt``, only
        the first ``prompt`` keys are the prompt (announced at scheduling), the rest its response."""
        self.rid += 1
        rid = self.rid
        self.q.begin(rid, keys[:prompt], now)
        hit = []
        for k in keys[: len(keys) - 1]:  # vLLM always recomputes the last block of a full hit
            b = self.cached.get(k)
            if b is None:
                break
            hit.append(b)
        for b in hit:
            if b.ref_cnt == 0:
                self.q.remove(b)
            b.ref_cnt += 1
        self.q.on_hit(hit)
        new = self.q.popleft_n(len(keys) - len(hit))
        for b in new:
            assert b.ref_cnt == 0 and b is not self.null
            if b.block_hash is not None:
                if self.cached.get(b.block_hash) is b:
                    del self.cached[b.block_hash]
                    self.evicted.append(b.block_hash)
                b.block_hash = None
            b.ref_cnt = 1
        blocks = hit + new
        for i in range(len(hit), len(keys)):
            blocks[i].block_hash = keys[i]
            self.cached.setdefault(keys[i], blocks[i])
        self.q.on_cached(rid, blocks, len(hit), len(keys))
        first, last = [], []
        for b in reversed(blocks):
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                (first if b.block_hash is None else last).append(b)
        self.q.prepend_n(first)
        self.q.append_n(last)
        self.check()
        return len(hit)

    def check(self) -> None:
        free = self.q.get_all_free_blocks()
        assert self.q.num_free_blocks == len(free) == len({b.block_id for b in free})
        assert {b.block_id for b in free} == {b.block_id for b in self.blocks if b.ref_cnt == 0 and b is not self.null}


def chain(prefix: str, n: int) -> list[str]:
    return [f"{prefix}/{i}" for i in range(n)]


def test_tail_evicted_first_and_leaves_only() -> None:
    p = Pool(9, "lru")  # 8 usable blocks
    p.run(chain("a", 4), 0.0)
    p.run(chain("b", 4), 1.0)
    p.run(chain("c", 2), 2.0)  # needs 2 blocks: a's tail goes first, leaf by leaf
    assert p.evicted == ["a/3", "a/2"]
    assert p.run(chain("a", 4), 3.0) == 2  # a/0 and a/1 survived
    assert p.q.stats["fallback_evictions"] == 0


def test_response_blocks_join_their_request() -> None:
    """Blocks vLLM caches past the prompt it announced (the response's) reach the policy's extend: used
    once in the request's class, the last one the tail; the next turn reuses them as hits."""
    p = Pool(20, "adaptive")
    p.run(chain("a", 5), 0.0, prompt=3)
    pol = p.q.policy
    assert [pol._meta[k][2] for k in chain("a", 5)] == [1] * 5  # none provisional
    assert [pol._meta[k][1] // pol._nf % 2 for k in chain("a", 5)] == [0, 0, 0, 0, 1]
    before = sum(map(sum, pol._hits))
    assert p.run(chain("a", 7), 10.0) == 5
    assert sum(map(sum, pol._hits)) - before == 5 and pol._td == 2


def test_hit_takes_block_out_of_candidates() -> None:
    p = Pool(5, "lru")
    p.run(chain("a", 2), 0.0)
    p.run(chain("a", 2) + ["x"], 1.0)  # hits a/0, a/1 (pinned while in use), evicts nothing cached
    assert p.evicted == []
    p.run(chain("b", 3), 2.0)  # one uncached block, then leaves tail first: x, then a/1
    assert p.evicted == ["x", "a/1"]


def test_duplicates_and_uncached_are_reused_before_cached_blocks() -> None:
    p = Pool(6, "lru")
    p.run(chain("a", 3), 0.0)
    p.run(chain("a", 3), 1.0)  # full hit: vLLM recomputes a/2 into a second block (a duplicate)
    assert p.q.snapshot()["dup_free"] == 1
    p.run(["z"], 2.0)  # takes an uncached block first, then the duplicate: no eviction
    p.run(["y"], 3.0)
    assert p.evicted == [] and p.q.stats["dup_reuses"] == 1


class NoAdmit:
    """A policy wrapper refusing one key (to exercise admission)."""

    def __init__(self, refuse: str) -> None:
        self.inner, self.refuse = make_policy("lru"), refuse

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def admit(self, key, depth, now):
        return key != self.refuse


def test_refused_blocks_are_reused_first() -> None:
    p = Pool(8, "lru")
    p.q = PolicyFreeQueue(p.blocks[1:], NoAdmit("b/1"), 7)
    p.run(chain("a", 3), 0.0)
    p.run(chain("b", 3), 1.0)  # b/1 refused, and b/2 with it
    assert p.q.stats["refused"] == 2 and p.q.snapshot()["refused_free"] == 2
    p.run(chain("c", 3), 2.0)  # 1 uncached + the 2 refused blocks: nothing admitted is evicted
    assert set(p.evicted) == {"b/1", "b/2"}
    assert p.run(chain("a", 3), 3.0) == 2


def test_without_admission_every_block_is_tracked() -> None:
    """The engine default (admission off): the policy is never asked, nothing is refused."""
    p = Pool(8, "lru")
    p.q = PolicyFreeQueue(p.blocks[1:], NoAdmit("b/1"), 7, admission=False)
    p.run(chain("a", 3), 0.0)
    p.run(chain("b", 3), 1.0)
    assert p.q.stats["refused"] == 0 and p.q.snapshot()["refused_free"] == 0
    p.run(chain("c", 3), 2.0)  # 1 uncached block, then LRU leaves: a's tail first
    assert p.evicted == ["a/2", "a/1"]


def test_bad_admission_flag_is_refused_loudly(monkeypatch) -> None:
    monkeypatch.setenv(ENV_ADMISSION, "yes")
    with pytest.raises(UnsupportedVLLMError, match=ENV_ADMISSION):
        install("lru")


def test_a_refused_block_hit_again_is_admitted() -> None:
    p = Pool(12, "lru")
    p.q = PolicyFreeQueue(p.blocks[1:], NoAdmit("b/1"), 11)
    p.run(chain("b", 3), 0.0)  # b/1 and b/2 refused, still cached by "vLLM"
    assert p.run(chain("b", 3) + ["x"], 1.0) == 3  # the refused blocks hit
    assert p.q.stats["promoted"] == 2 and p.q.snapshot()["refused_free"] == 0
    p.run(chain("c", 8), 2.0)  # needs 8 of 11: 3 uncached, then x and the leaves of b, tail first
    assert p.evicted == ["x", "b/2", "b/1", "b/0"][: len(p.evicted)]


def test_reset_makes_every_free_block_uncached() -> None:
    p = Pool(6, "adaptive")
    p.run(chain("a", 3), 0.0)
    for b in p.blocks:
        b.block_hash = None
    p.cached.clear()
    p.q.on_reset()
    assert p.q.snapshot()["tracked"] == 0 and p.q.num_free_blocks == 5
    assert p.run(chain("a", 3), 1.0) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 5)), min_size=1, max_size=40),
       st.sampled_from(["lru", "lfu", "arc", "adaptive"]), st.integers(7, 20))
def test_random_workload_keeps_the_queue_consistent(reqs, policy, n) -> None:
    """Conversations share prefixes; every step the pool invariants hold, hits are
    real cached prefixes, and a leaf is always available (no fallback)."""
    p = Pool(n, policy)
    for t, (conv, length) in enumerate(reqs):
        keys = ["sys"] + chain(f"c{conv}", length)
        hit = p.run(keys[: n - 2], float(t))
        assert 0 <= hit < len(keys[: n - 2])
    assert p.q.stats["fallback_evictions"] == 0


def test_register_is_a_no_op_without_the_variable(monkeypatch) -> None:
    monkeypatch.delenv(ENV_POLICY, raising=False)
    register()  # must not import vllm nor patch anything
    monkeypatch.setenv(ENV_POLICY, "  ")
    register()


def test_unknown_policy_is_refused_loudly(monkeypatch) -> None:
    monkeypatch.setenv(ENV_POLICY, "no-such-policy")
    with pytest.raises(UnsupportedVLLMError, match="no-such-policy"):
        register()
    with pytest.raises(UnsupportedVLLMError, match="future"):
        install("belady")


def test_missing_vllm_is_refused_loudly() -> None:
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is importable in this interpreter (the interop venv checks versions)")
    with pytest.raises(UnsupportedVLLMError, match="cannot be imported"):
        install("lru")
