"""Prefix-aware Belady: the offline optimum, for upper bounds (Belady, IBM Systems Journal 1966).

Given the future sequence of requests, evict the candidate leaf whose next use
is farthest away, and never admit a block that is never used again.  With
chained blocks a hit on a block is a hit on its whole prefix, so a parent's next
use is never later than its children's: choosing among leaves loses nothing, and
refusing a block that has no future use refuses its (never reused) descendants
too.  Requests are counted by :meth:`begin`; the k-th call is request k of ``future``.
"""
from __future__ import annotations

from typing import Hashable, Sequence

from ..base import HeapPolicy, PolicyUnavailableError

_NEVER = float("inf")


class Belady(HeapPolicy):
    """Farthest next use first; blocks with no future use are not admitted."""

    name = "belady"

    def __init__(self, future: Sequence[Sequence[Hashable]] | None = None, admit_once: bool = False) -> None:
        super().__init__()
        if future is None:
            raise PolicyUnavailableError("belady needs the future: make_policy('belady', future=[keys, ...])")
        #: key -> request indices that use it, ascending (fixed after construction).
        self._occ: dict[Hashable, list[int]] = {}
        for r, keys in enumerate(future):
            for k in keys:
                lst = self._occ.get(k)
                if lst is None:
                    self._occ[k] = [r]
                elif lst[-1] != r:
                    lst.append(r)
        #: key -> position in _occ[key] of the first use not yet passed.
        self._ptr: dict[Hashable, int] = {}
        #: Index of the current request (begin() calls - 1).
        self._r = -1
        #: key -> chain depth (deeper goes first among equal next uses).
        self._depth: dict[Hashable, int] = {}
        #: When True, blocks with no future use are still cached (plain Belady without bypass).
        self.admit_once = admit_once

    def begin(self, keys: Sequence[Hashable], now: float) -> None:
        self._r += 1

    def next_use(self, key: Hashable) -> float:
        """Index of the next request after the current one that uses ``key`` (inf: never)."""
        occ = self._occ.get(key)
        if occ is None:
            return _NEVER
        p = self._ptr.get(key, 0)
        r = self._r
        n = len(occ)
        while p < n and occ[p] <= r:
            p += 1
        self._ptr[key] = p
        return occ[p] if p < n else _NEVER

    def admit(self, key: Hashable, depth: int, now: float) -> bool:
        return self.admit_once or self.next_use(key) != _NEVER

    def on_insert(self, key: Hashable, depth: int, now: float) -> None:
        self._depth[key] = depth

    def priority(self, key: Hashable) -> tuple[float, int]:
        return -self.next_use(key), -self._depth.get(key, 0)

    def on_remove(self, key: Hashable) -> None:
        super().on_remove(key)
        self._depth.pop(key, None)
