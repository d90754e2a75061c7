"""Hypothesis stateful test: three replicas route, release, publish, lose, duplicate and deliver sync
batches in any order; whenever the channel is drained, every replica's load equals the truth (the sum of
the replicas' own requests), and no counter ever goes negative."""
from __future__ import annotations

import os
import sys

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvroute.router import Router
from kvroute.sync import ReplicaSync

sys.path.insert(0, os.path.dirname(__file__))
from test_sync import WORKERS, load, truth  # noqa: E402

N = 3


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


class Replicas(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.routers = [Router(WORKERS, 4, clock=self.clock, request_ttl_s=1000.0) for _ in range(N)]
        self.syncs = [ReplicaSync(r, f"r{k}", clock=self.clock, incarnation="0", lease_s=50.0, heartbeat_s=10.0)
                      for k, r in enumerate(self.routers)]
        self.channel: list[bytes] = []
        self.cursor = [0] * N
        self.live: list[set] = [set() for _ in range(N)]
        self.next_id = 0

    @rule(k=st.integers(0, N - 1), seed=st.integers(0, 5), n=st.integers(4, 24))
    def route(self, k, seed, n):
        rid = self.next_id
        self.next_id += 1
        self.routers[k].route([seed * 100 + i for i in range(n)], request_id=rid)
        self.live[k].add(rid)

    @precondition(lambda self: any(self.live))
    @rule(k=st.integers(0, N - 1), data=st.data(), whole=st.booleans())
    def release(self, k, data, whole):
        if not self.live[k]:
            return
        rid = data.draw(st.sampled_from(sorted(self.live[k])))
        if whole:
            self.routers[k].finish(rid)
            self.live[k].discard(rid)
        else:
            self.routers[k].prefill_done(rid)

    @rule(k=st.integers(0, N - 1), lose=st.booleans())
    def publish(self, k, lose):
        b = self.syncs[k].take_batch()
        if b is not None and not lose:
            self.channel.append(b)

    @rule(k=st.integers(0, N - 1), dup=st.booleans())
    def deliver(self, k, dup):
        if self.cursor[k] < len(self.channel):
            self.syncs[k].receive(self.channel[self.cursor[k]])
            if not dup:
                self.cursor[k] += 1

    @rule(k=st.integers(0, N - 1), junk=st.binary(max_size=40))
    def junk(self, k, junk):
        self.syncs[k].receive(junk)

    @rule(dt=st.floats(0.0, 5.0))
    def advance(self, dt):
        self.clock.t += dt
        for s in self.syncs:
            s.tick()

    @rule()
    def drain(self):
        """Wait one heartbeat (a lost last batch shows as a gap only behind a later one), then publish
        everything and deliver everything until nobody has anything to say: then all agree."""
        self.clock.t += 10.0
        for s in self.syncs:
            self.channel.append(s.take_batch())  # the heartbeat now due
        for _ in range(20):
            moved = False
            for k, s in enumerate(self.syncs):
                while s.has_output():
                    self.channel.append(s.take_batch())
                    moved = True
            for k, s in enumerate(self.syncs):
                while self.cursor[k] < len(self.channel):
                    s.receive(self.channel[self.cursor[k]])
                    self.cursor[k] += 1
                    moved = True
            if not moved:
                break
        truth = self.truth()
        for r in self.routers:
            assert self.load(r) == truth

    def load(self, r):
        return load(r)

    def truth(self):
        return truth(*self.routers)

    @invariant()
    def never_negative(self):
        for r in self.routers:
            for t in self.load(r).values():
                assert min(t) >= 0, t


TestReplicas = Replicas.TestCase
TestReplicas.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
