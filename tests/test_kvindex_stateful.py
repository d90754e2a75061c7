"""KVIndex against a dict-of-sets reference model, with check_invariants() after every step."""
from __future__ import annotations

import itertools

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvroute import KVIndex, Tier
from kvroute.kvindex.hashing import block_hash_list

WORKERS = ["w0", "w1", "w2", 7]
TIERS = [Tier.GPU, Tier.HOST, Tier.DISK]
# A small universe of prompts: tokens from {0,1,2}, one token a block, up to 5 blocks.
PROMPTS = [list(p) for n in range(1, 6) for p in itertools.product(range(3), repeat=n)]
prompt = st.sampled_from(PROMPTS)


def engine_key(worker, c: int):
    """Each worker names blocks its own way (ints for some, bytes for others)."""
    if worker == "w1":
        return (c ^ 0x5A5A5A5A) & ((1 << 64) - 1)
    if worker == 7:
        return c.to_bytes(8, "little")
    return None  # w0, w2: no engine hashes, content hash is the key


class IndexMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.index = KVIndex()
        #: reference: worker -> {content hash -> set of tiers}
        self.ref: dict = {}

    def _hashes(self, p):
        return block_hash_list(p, 1)

    @rule(worker=st.sampled_from(WORKERS), p=prompt, start=st.integers(0, 4), tier=st.sampled_from(TIERS))
    def store(self, worker, p, start, tier):
        hs = self._hashes(p)
        start = min(start, len(hs) - 1)
        chain = hs[start:]
        parent = hs[start - 1] if start else None
        keys = None if engine_key(worker, 0) is None else [engine_key(worker, c) for c in chain]
        self.index.store(worker, chain, parent=parent, tier=tier, engine_hashes=keys)
        held = self.ref.setdefault(worker, {})
        for c in chain:
            held.setdefault(c, set()).add(tier)

    @precondition(lambda self: self.ref)
    @rule(data=st.data(), tier=st.sampled_from(TIERS), by_engine=st.booleans())
    def remove(self, data, tier, by_engine):
        worker = data.draw(st.sampled_from(sorted(self.ref, key=str)))
        held = self.ref[worker]
        pool = sorted(held) + self._hashes([1, 1, 1])  # some unknown blocks too
        chosen = data.draw(st.lists(st.sampled_from(pool), max_size=4, unique=True))
        if by_engine and engine_key(worker, 0) is not None:
            removed = self.index.remove(worker, engine_hashes=[engine_key(worker, c) for c in chosen], tier=tier)
        else:
            removed = self.index.remove(worker, chosen, tier=tier)
        expect = 0
        for c in chosen:
            if tier in held.get(c, ()):
                expect += 1
                held[c].discard(tier)
                if not held[c]:
                    del held[c]
        assert removed == expect

    @precondition(lambda self: self.ref)
    @rule(data=st.data())
    def clear(self, data):
        worker = data.draw(st.sampled_from(sorted(self.ref, key=str)))
        n = self.index.clear(worker)
        assert n == sum(len(t) for t in self.ref[worker].values())
        self.ref[worker] = {}

    @precondition(lambda self: self.ref)
    @rule(data=st.data())
    def remove_worker(self, data):
        worker = data.draw(st.sampled_from(sorted(self.ref, key=str)))
        self.index.remove_worker(worker)
        del self.ref[worker]

    @rule(p=prompt)
    def match(self, p):
        hs = self._hashes(p)
        got = self.index.match(hs)
        expect = {}
        for worker, held in self.ref.items():
            total = 0
            counts = [0, 0, 0]
            for c in hs:
                if c not in held:
                    break
                total += 1
                counts[min(held[c])] += 1
            if total:
                expect[worker] = (total, *counts)
        assert {w: tuple(o) for w, o in got.items()} == expect

    @rule()
    def snapshot_roundtrip(self):
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "idx.snap")
            self.index.save(path)
            loaded = KVIndex.load(path)
        loaded.check_invariants()
        for worker in self.ref:
            assert loaded.blocks_of(worker) == self.index.blocks_of(worker)
        # engine-hash aliases survive the round trip
        for worker, held in self.ref.items():
            if engine_key(worker, 0) is not None:
                for c in held:
                    assert loaded.content_hash_of(worker, engine_key(worker, c)) == c

    @invariant()
    def invariants_hold(self):
        self.index.check_invariants()
        for worker, held in self.ref.items():
            assert self.index.blocks_of(worker) == {c: frozenset(t) for c, t in held.items()}
        assert len(self.index) == sum(len(t) for held in self.ref.values() for t in held.values())


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
