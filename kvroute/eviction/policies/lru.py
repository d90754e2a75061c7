"""LRU with vLLM's semantics.

vLLM v1's ``BlockPool`` keeps blocks with ref count 0 in a free queue in the
order they were freed and evicts from its head; a finished request frees its
blocks in reverse, so the tail of a prompt goes before its head, and a hit takes
a block out of the queue.  Here the priority of a candidate is the sequence
number of its last release: the earliest-released leaf goes first (the cache
offers only leaves, which vLLM's queue order gives almost always by itself).
"""
from __future__ import annotations

from typing import Hashable

from ..base import HeapPolicy


class LRU(HeapPolicy):
    """Least recently released first (vLLM free-queue order)."""

    name = "lru"

    def __init__(self) -> None:
        super().__init__()
        #: key -> release sequence number (insert counts as a release for blocks never pinned).
        self._rel: dict[Hashable, int] = {}
        #: Release counter.
        self._clock = 0

    def on_insert(self, key: Hashable, depth: int, now: float) -> None:
        self._clock += 1
        self._rel[key] = self._clock

    def on_release(self, key: Hashable, now: float) -> None:
        self._clock += 1
        self._rel[key] = self._clock

    def priority(self, key: Hashable) -> int:
        return self._rel[key]

    def on_remove(self, key: Hashable) -> None:
        super().on_remove(key)
        self._rel.pop(key, None)
