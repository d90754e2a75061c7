"""Votes (kvroute.eviction.shadow): a Hypothesis stateful test against a dict-based model, and the
follow rule it implements, on hand-made shadows."""
from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvroute.eviction.shadow import Votes

KEYS = st.integers(0, 11)
SHADOW = st.integers(0, 2)


class _Shadow(set):
    """A stand-in shadow: only ``key in shadow`` is asked of it."""


class VotesMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.shadows = (_Shadow(), _Shadow(), _Shadow())
        self.v = Votes(self.shadows)
        self.tick = itertools.count()
        #: model: candidate -> [add order, level entry order]
        self.cand: dict[int, list[int]] = {}
        self.leader = 0

    def _prio(self, k: int) -> int:
        absent = [k not in sh for sh in self.shadows]
        others = sum(a for i, a in enumerate(absent) if i != self.leader)
        return 3 + others if absent[self.leader] else others

    @rule(k=KEYS)
    def add(self, k: int) -> None:
        self.v.add(k)
        if k not in self.cand:
            t = next(self.tick)
            self.cand[k] = [t, t]

    @rule(k=KEYS)
    def discard(self, k: int) -> None:
        self.v.discard(k)
        self.cand.pop(k, None)

    def _shadow_change(self, i: int, k: int, hold: bool) -> None:
        sh = self.shadows[i]
        before = self._prio(k) if k in self.cand else None
        if hold:
            was = k in sh
            sh.add(k)
            if not was:
                self.v.held(i, k)
        else:
            was = k in sh
            sh.discard(k)
            if was:
                self.v.dropped(i, k)
        if before is not None and self._prio(k) != before:
            self.cand[k][1] = next(self.tick)

    @rule(i=SHADOW, k=KEYS)
    def shadow_adds(self, i: int, k: int) -> None:
        self._shadow_change(i, k, True)

    @rule(i=SHADOW, k=KEYS)
    def shadow_drops(self, i: int, k: int) -> None:
        self._shadow_change(i, k, False)

    @rule(i=SHADOW)
    def set_leader(self, i: int) -> None:
        self.v.set_leader(i)
        if i != self.leader:
            self.leader = i
            for e in self.cand.values():
                e[1] = e[0]

    @invariant()
    def agrees_with_model(self) -> None:
        self.v.check_invariants()
        assert len(self.v) == len(self.cand)
        ranked = [(self._prio(k), -e[1], k) for k, e in self.cand.items() if self._prio(k) > 0]
        want = max(ranked)[2] if ranked else None
        assert self.v.victim() == want
        for k in self.cand:
            assert self.v.holds(k) == (k in self.shadows[self.leader])


TestVotes = VotesMachine.TestCase
TestVotes.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_leader_absent_first_then_by_agreement():
    a, b, c = _Shadow({1, 2, 3}), _Shadow({1, 2}), _Shadow({1})
    v = Votes((a, b, c))
    for k in (1, 2, 3, 4):
        v.add(k)
    # leader a: 4 is absent from all three (level 5) -> first
    assert v.victim() == 4
    v.discard(4)
    # then leader-held blocks the others dropped: 3 (two others) before 2 (one other)
    assert v.victim() == 3
    v.set_leader(2)  # leader c: 2 and 3 are absent from it; 3 is absent from b too
    assert v.victim() == 3
    c.add(3)
    v.held(2, 3)
    assert v.victim() == 2
    v.discard(2)
    v.discard(3)
    assert v.victim() is None  # every shadow holds 1
