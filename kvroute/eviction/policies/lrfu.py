"""LRFU (Lee, Choi, Kim, Noh, Min, Cho, Kim: "LRFU: a spectrum of policies that
subsumes the LRU and LFU policies", IEEE Trans. Computers 50(12), 2001; SIGMETRICS'99).

Each block's Combined Recency and Frequency value is
``CRF(t) = sum over past references t_i of (1/2) ** (lam * (t - t_i))``;
the block with the smallest CRF is evicted.  ``lam = 0`` is LFU, large ``lam``
tends to LRU.  All CRFs decay by the same factor, so the order is kept in the
log domain: ``log2 CRF(t) + lam * t`` is constant between references and is the
heap priority (no re-sorting as time passes).  ``lam`` is per second of the
cache's clock; the default was the best of a sweep on the bundled conversation
trace (reported in docs/eviction.md), not tuned per run.
"""
from __future__ import annotations

import math
from typing import Hashable

from ..base import HeapPolicy


class LRFU(HeapPolicy):
    """Smallest combined recency-frequency value first."""

    name = "lrfu"

    def __init__(self, lam: float = 0.01) -> None:
        super().__init__()
        if lam < 0:
            raise ValueError("lam must be >= 0")
        #: Decay rate per second (fixed).
        self.lam = lam
        #: key -> log2 CRF at its last reference + lam * that time ("score", time-invariant).
        self._score: dict[Hashable, float] = {}
        #: key -> release sequence number (tie-break).
        self._rel: dict[Hashable, int] = {}
        self._clock = 0

    def _ref(self, key: Hashable, now: float) -> None:
        s = self._score.get(key)
        base = self.lam * now
        if s is None:
            self._score[key] = base  # log2(1) + lam*now
        else:
            # log2(2**(s - base) + 1) + base, computed stably
            d = s - base
            self._score[key] = base + (d + math.log2(1.0 + 2.0 ** -d) if d > 0 else math.log2(1.0 + 2.0 ** d))

    def on_insert(self, key: Hashable, depth: int, now: float) -> None:
        self._score.pop(key, None)
        self._ref(key, now)
        self._clock += 1
        self._rel[key] = self._clock

    def on_access(self, key: Hashable, now: float) -> None:
        self._ref(key, now)

    def on_release(self, key: Hashable, now: float) -> None:
        self._clock += 1
        self._rel[key] = self._clock

    def priority(self, key: Hashable) -> tuple[float, int]:
        return self._score[key], self._rel[key]

    def on_remove(self, key: Hashable) -> None:
        super().on_remove(key)
        self._score.pop(key, None)
        self._rel.pop(key, None)

    def describe(self) -> dict:
        return {"name": self.name, "lam": self.lam}
