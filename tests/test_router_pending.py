"""Hypothesis stateful test of the speculative-prefix table against a reference model.

Reference: a list of (added_at, slot, chain) records.  The table promises that a
record is visible for at least ``ttl`` and at most ``2 * ttl``, so every match
must lie between the longest common prefix over the records that must still be
visible and over those that may still be visible.
"""
from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvroute.router.pending import PendingPrefixes

TTL = 1.0
#: Three base prompts of 6 blocks; block i of base b is named by its chained prefix (b, i).
BASES = 3
LEN = 6


def chain(base: int, n: int) -> list[int]:
    return [base * 100 + i + 1 for i in range(n)]


def lcp(a: list[int], b: list[int]) -> int:
    k = 0
    while k < len(a) and k < len(b) and a[k] == b[k]:
        k += 1
    return k


class PendingMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.now = 0.0
        self.table = PendingPrefixes(TTL, lambda: self.now)
        self.records: list[tuple[float, int, list[int]]] = []

    @rule(slot=st.integers(0, 4), base=st.integers(0, BASES - 1), n=st.integers(1, LEN))
    def add(self, slot: int, base: int, n: int) -> None:
        hs = chain(base, n)
        self.table.add(slot, hs)
        self.records.append((self.now, slot, hs))

    @rule(dt=st.sampled_from([0.0, 0.1, 0.4, 0.7, 1.0, 1.3, 2.5]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.table.expire()

    @rule(slot=st.integers(0, 4))
    def forget(self, slot: int) -> None:
        self.table.forget(slot)
        self.records = [r for r in self.records if r[1] != slot]

    @rule(base=st.integers(0, BASES - 1), n=st.integers(1, LEN), other=st.booleans())
    def match(self, base: int, n: int, other: bool) -> None:
        q = chain(base, n)
        if other:  # a prompt that leaves the base after its first block
            q = q[:1] + [999_000 + i for i in range(n - 1)]
        got = self.table.match(q)
        for slot in range(5):
            must = max((lcp(q, hs) for t, s, hs in self.records if s == slot and self.now - t < TTL), default=0)
            may = max((lcp(q, hs) for t, s, hs in self.records if s == slot and self.now - t < 2 * TTL), default=0)
            d = got.get(slot, 0)
            assert must <= d <= may, (slot, must, d, may)

    @invariant()
    def invariants(self) -> None:
        self.table.check_invariants()


TestPending = PendingMachine.TestCase
TestPending.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
