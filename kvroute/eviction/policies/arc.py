"""ARC (Megiddo & Modha, "ARC: A Self-Tuning, Low Overhead Replacement Cache", FAST'03),
restricted to the cache's candidates (unpinned leaves).

Resident blocks are in T1 (seen once while resident) or T2 (seen again);
evicted ones leave ghosts in B1/B2.  A miss that finds its ghost in B1 grows
the target size ``p`` of T1 (recency is paying), one in B2 shrinks it
(frequency is paying); the victim is the least recently released candidate of
T1 when ``|T1| > p``, else of T2.  ARC sizes its ghosts by the capacity ``c``;
the policy does not know it and takes the most blocks it has seen resident.
vLLM's CPU offload tier ships ARC too; this one follows the paper.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Hashable

from ..base import EvictionPolicy


class ARC(EvictionPolicy):
    """Adaptive Replacement Cache over leaf candidates."""

    name = "arc"

    def __init__(self) -> None:
        #: key -> 1 (T1) or 2 (T2) for resident blocks.
        self._list: dict[Hashable, int] = {}
        #: Resident blocks per list [unused, |T1|, |T2|].
        self._size = [0, 0, 0]
        #: Ghost lists (key -> None, oldest first).
        self._b1: OrderedDict = OrderedDict()
        self._b2: OrderedDict = OrderedDict()
        #: Target size of T1 (adapted online).
        self.p = 0.0
        #: Capacity estimate: most resident blocks seen.
        self._c = 1
        #: key -> release sequence number.
        self._rel: dict[Hashable, int] = {}
        self._clock = 0
        #: Candidate heaps per list [unused, T1, T2] of (rel, key); _cand[key] = rel of its live entry.
        self._heaps: list[list] = [[], [], []]
        self._cand: dict[Hashable, int] = {}

    def on_insert(self, key: Hashable, depth: int, now: float) -> None:
        c = self._c
        if key in self._b1:
            self.p = min(float(c), self.p + max(len(self._b2) / max(1, len(self._b1)), 1.0))
            del self._b1[key]
            lst = 2
        elif key in self._b2:
            self.p = max(0.0, self.p - max(len(self._b1) / max(1, len(self._b2)), 1.0))
            del self._b2[key]
            lst = 2
        else:
            lst = 1
        self._list[key] = lst
        self._size[lst] += 1
        n = len(self._list)
        if n > self._c:
            self._c = n
        self._clock += 1
        self._rel[key] = self._clock

    def on_access(self, key: Hashable, now: float) -> None:
        if self._list.get(key) == 1:
            self._list[key] = 2
            self._size[1] -= 1
            self._size[2] += 1

    def on_release(self, key: Hashable, now: float) -> None:
        self._clock += 1
        self._rel[key] = self._clock

    def set_candidate(self, key: Hashable, flag: bool) -> None:
        if flag:
            r = self._rel[key]
            self._cand[key] = r
            heapq.heappush(self._heaps[self._list[key]], (r, key))
            if len(self._heaps[1]) + len(self._heaps[2]) > 4 * len(self._cand) + 1024:
                for i in (1, 2):
                    h = [e for e in self._heaps[i] if self._cand.get(e[1]) == e[0] and self._list.get(e[1]) == i]
                    heapq.heapify(h)
                    self._heaps[i] = h
        else:
            self._cand.pop(key, None)

    def _top(self, i: int) -> Hashable | None:
        h, cand, lst = self._heaps[i], self._cand, self._list
        while h:
            r, key = h[0]
            if cand.get(key) == r and lst.get(key) == i:
                return key
            heapq.heappop(h)
        return None

    def victim(self) -> Hashable | None:
        first, second = (1, 2) if self._size[1] > self.p else (2, 1)
        v = self._top(first)
        return v if v is not None else self._top(second)

    def on_remove(self, key: Hashable) -> None:
        lst = self._list.pop(key, None)
        self._cand.pop(key, None)
        self._rel.pop(key, None)
        if lst is None:
            return
        self._size[lst] -= 1
        ghost = self._b1 if lst == 1 else self._b2
        ghost[key] = None
        c = self._c
        while len(self._b1) > c:
            self._b1.popitem(last=False)
        while len(self._b1) + len(self._b2) > 2 * c and self._b2:
            self._b2.popitem(last=False)

    def candidates(self) -> int:
        return len(self._cand)

    def describe(self) -> dict:
        return {"name": self.name, "p": self.p, "c": self._c}
