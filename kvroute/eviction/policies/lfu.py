"""LFU: fewest accesses first, ties broken by least recent release.

Counts live while a block is cached in the tier (a block that leaves and comes
back starts again at one), as in SGLang's ``lfu`` radix-cache policy.  Because
a hit on a prefix touches every block of it, a parent's count is never below
its children's, so leaves-first eviction and LFU agree.
"""
from __future__ import annotations

from typing import Hashable

from ..base import HeapPolicy


class LFU(HeapPolicy):
    """Least frequently used (per-residency counts), LRU among equals."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        #: key -> accesses during this residency (insert counts one).
        self._count: dict[Hashable, int] = {}
        #: key -> release sequence number (tie-break).
        self._rel: dict[Hashable, int] = {}
        self._clock = 0

    def on_insert(self, key: Hashable, depth: int, now: float) -> None:
        self._count[key] = 1
        self._clock += 1
        self._rel[key] = self._clock

    def on_access(self, key: Hashable, now: float) -> None:
        self._count[key] = self._count.get(key, 0) + 1

    def on_release(self, key: Hashable, now: float) -> None:
        self._clock += 1
        self._rel[key] = self._clock

    def priority(self, key: Hashable) -> tuple[int, int]:
        return self._count[key], self._rel[key]

    def on_remove(self, key: Hashable) -> None:
        super().on_remove(key)
        self._count.pop(key, None)
        self._rel.pop(key, None)
