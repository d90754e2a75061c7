"""Hypothesis stateful tests of TieredCache.

1. With LRU on both tiers, against a small dict-based reference model that
   re-implements the documented rules with linear scans (exact victims).
2. With every other registered policy: structural invariants, pins, lookups
   consistent with the cached blocks, and a KVIndex following the events.
"""
from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvroute.eviction import POLICIES, TieredCache, index_follower, make_policy
from kvroute.kvindex import KVIndex

_PATHS: dict[tuple, int] = {}


def chain(path: tuple) -> list[int]:
    """Chained keys of a path in a small trie (equal prefixes, equal keys)."""
    out = []
    for i in range(1, len(path) + 1):
        out.append(_PATHS.setdefault(path[:i], len(_PATHS) + 1))
    return out


paths = st.lists(st.integers(0, 2), min_size=1, max_size=5).map(tuple)
# occasionally a raw list of keys (a key under a different parent: the conflict path)
requests = st.one_of(paths.map(chain), paths.map(chain), st.lists(st.integers(1, 12), min_size=1, max_size=4))


class RefModel:
    """Dict-based reference of TieredCache + LRU on both tiers (linear scans, no heaps)."""

    def __init__(self, gpu: int, host: int) -> None:
        self.cap = (gpu, host)
        self.tier: dict[int, int] = {}
        self.parent: dict[int, int | None] = {}
        self.seq: dict[int, int] = {}
        self.pins: dict[int, int] = {}
        self.clock = [0, 0]  # per-tier LRU counters (each tier has its own policy)
        self.protected: set[int] = set()

    def _tick(self, k: int, t: int) -> None:
        self.clock[t] += 1
        self.seq[k] = self.clock[t]

    def kids(self, k: int, tier: int | None = None) -> list[int]:
        return [c for c, p in self.parent.items() if p == k and (tier is None or self.tier[c] == tier)]

    def n(self, t: int) -> int:
        return sum(1 for x in self.tier.values() if x == t)

    def _victim(self, t: int) -> int | None:
        if t == 0:
            cands = [k for k, x in self.tier.items() if x == 0 and k not in self.pins and not self.kids(k, 0)]
        else:
            cands = [k for k, x in self.tier.items() if x == 1 and not self.kids(k) and k not in self.protected]
        return min(cands, key=lambda k: self.seq[k]) if cands else None

    def _drop(self, k: int) -> None:
        for c in self.kids(k):
            self._drop(c)
        del self.tier[k], self.parent[k], self.seq[k]

    def _room_host(self) -> bool:
        while self.n(1) >= self.cap[1]:
            v = self._victim(1)
            if v is None:
                return False
            self._drop(v)
        return True

    def _room_gpu(self) -> bool:
        while self.n(0) >= self.cap[0]:
            v = self._victim(0)
            if v is None:
                return False
            if self.cap[1] and self._room_host():
                self.tier[v] = 1
                self._tick(v, 1)
            else:
                self._drop(v)
        return True

    def start(self, keys: list[int]) -> tuple:
        g = h = ins = prom = 0
        pinned: list[int] = []
        prev = None
        i = 0
        while i < len(keys) and keys[i] in self.tier and self.parent[keys[i]] == prev:
            k = keys[i]
            if self.tier[k] == 0:
                g += 1
                self.pins[k] = self.pins.get(k, 0) + 1
                pinned.append(k)
            else:
                if not h:
                    j, p = i, prev
                    while j < len(keys) and self.tier.get(keys[j]) == 1 and self.parent[keys[j]] == p:
                        self.protected.add(keys[j])
                        p = keys[j]
                        j += 1
                h += 1
                if len(pinned) == i and self._room_gpu():
                    self.tier[k] = 0
                    self._tick(k, 0)
                    self.pins[k] = 1
                    pinned.append(k)
                    prom += 1
            prev = k
            i += 1
        self.protected.clear()
        if len(pinned) == i:
            while i < len(keys):
                k = keys[i]
                if k in self.tier or not self._room_gpu():
                    break
                self.tier[k], self.parent[k] = 0, prev
                self._tick(k, 0)
                self.pins[k] = 1
                pinned.append(k)
                ins += 1
                prev = k
                i += 1
        return (g, h, prom, ins), pinned

    def finish(self, pinned: list[int]) -> None:
        for k in reversed(pinned):
            self.pins[k] -= 1
            if not self.pins[k]:
                del self.pins[k]
                self._tick(k, 0)

    def lookup(self, keys: list[int]) -> tuple[int, int]:
        g = h = 0
        prev = None
        for k in keys:
            if k not in self.tier or self.parent[k] != prev:
                break
            if self.tier[k] == 0 and not h:
                g += 1
            else:
                h += 1
            prev = k
        return g, h


def index_tiers(ix: KVIndex) -> dict:
    return {k: int(min(ts)) for k, ts in ix.blocks_of("w").items()}


class LRUAgainstModel(RuleBasedStateMachine):
    @initialize(gpu=st.integers(1, 6), host=st.integers(0, 6))
    def setup(self, gpu, host):
        self.ix = KVIndex()
        self.cache = TieredCache(gpu, host, "lru", on_event=index_follower(self.ix, "w"))
        self.model = RefModel(gpu, host)
        self.open: list = []

    @rule(keys=requests)
    def start(self, keys):
        assert self.cache.lookup(keys) == self.model.lookup(keys)
        t = self.cache.start_request(keys)
        want, pinned = self.model.start(keys)
        assert (t.gpu_hit, t.host_hit, t.promoted, t.inserted) == want
        assert t.pinned == pinned
        self.open.append(t)

    @precondition(lambda self: self.open)
    @rule(i=st.integers(0, 10))
    def finish(self, i):
        t = self.open.pop(i % len(self.open))
        self.cache.finish_request(t)
        self.model.finish(t.pinned)

    @rule(keys=requests)
    def access(self, keys):
        t = self.cache.access(keys)
        want, pinned = self.model.start(keys)
        self.model.finish(pinned)
        assert (t.gpu_hit, t.host_hit, t.promoted, t.inserted) == want

    @invariant()
    def same_state(self):
        self.cache.check_invariants()
        self.ix.check_invariants()
        blocks = {k: int(t) for k, t in self.cache.blocks().items()}
        assert blocks == self.model.tier
        assert index_tiers(self.ix) == blocks
        for k in blocks:
            assert self.cache.pinned(k) == self.model.pins.get(k, 0)


TestLRUAgainstModel = LRUAgainstModel.TestCase
TestLRUAgainstModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])

_OTHER = sorted(n for n in POLICIES if n not in ("lru", "belady") and not n.startswith("lcs_")
                and n not in ("s3fifo", "sieve", "wtinylfu"))


class AnyPolicyInvariants(RuleBasedStateMachine):
    @initialize(gpu=st.integers(1, 6), host=st.integers(0, 6), name=st.sampled_from(_OTHER),
                gpu_admission=st.booleans())
    def setup(self, gpu, host, name, gpu_admission):
        self.ix = KVIndex()
        self.cache = TieredCache(gpu, host, name, on_event=index_follower(self.ix, "w"), gpu_admission=gpu_admission)
        self.open: list = []
        self.now = 0.0

    @rule(keys=requests, dt=st.floats(0, 100))
    def start(self, keys, dt):
        self.now += dt
        g, h = self.cache.lookup(keys)
        t = self.cache.start_request(keys, self.now)
        assert (t.gpu_hit, t.host_hit) == (g, h)
        assert t.gpu_hit + t.host_hit + t.inserted <= len(keys)
        for k in t.pinned:
            assert self.cache.pinned(k) > 0
        self.open.append(t)

    @precondition(lambda self: self.open)
    @rule(i=st.integers(0, 10))
    def finish(self, i):
        self.cache.finish_request(self.open.pop(i % len(self.open)), self.now)

    @rule(keys=requests, rate=st.floats(0, 10))
    def hint(self, keys, rate):
        self.cache.hint({k: rate for k in keys})

    @rule()
    def clear(self):  # an engine's prefix-cache reset; tickets still open release nothing afterwards
        self.cache.clear(self.now)
        assert self.cache.blocks() == {}
        if not self.cache.gpu_admission:
            assert self.cache.stats()["refused"] == 0

    @invariant()
    def consistent(self):
        self.cache.check_invariants()
        for pol in self.cache.policies:  # adaptive's two tiers follow the duel's shadows
            if getattr(pol, "_votes", None) is not None:
                pol._votes.check_invariants()
                assert set(pol._votes._mask) == set(pol._cand)
        if not self.cache.gpu_admission:
            assert self.cache.stats()["refused"] == 0
        blocks = {k: int(t) for k, t in self.cache.blocks().items()}
        assert index_tiers(self.ix) == blocks
        if not self.open:
            assert all(self.cache.pinned(k) == 0 for k in blocks)


TestAnyPolicyInvariants = AnyPolicyInvariants.TestCase
TestAnyPolicyInvariants.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])


def test_other_policies_listed():
    assert {"lfu", "lrfu", "arc", "adaptive"} <= set(_OTHER)
    assert make_policy("adaptive").name == "adaptive"
