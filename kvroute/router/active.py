"""Active blocks: the prompt blocks of unfinished requests, per worker, counted once.

Dynamo's router, with ``router_assume_kv_reuse`` (on by default in
ai-dynamo-runtime 1.6.1), charges a worker's decode load as the number of
*distinct* blocks its in-flight requests hold -- two requests sharing a
prefix share its KV -- and, for a candidate, adds those of the new request's
blocks not yet active there (``potential_decode_blocks``).  This table gives
the router both figures for a policy that asks for them
(``Policy.tracks_active_blocks``).

Layout (private; only :class:`ActiveBlocks` touches it)::

    _mask  : {content hash -> bitmask of worker slots where it is active}
    _count : {(content hash, slot) -> requests holding it there}
    _distinct : {slot -> number of distinct active blocks}

A request's blocks form a chain (chained hashes), so the blocks of a new
request active on a worker are a prefix of its chain: ``match`` walks the chain
once with bit masks, never once per worker.
"""
from __future__ import annotations

from typing import Sequence

from .masks import chain_depths


class ActiveBlocks:
    """Reference-counted active prompt blocks per worker slot."""

    __slots__ = ("_mask", "_count", "_distinct")

    def __init__(self) -> None:
        self._mask: dict[int, int] = {}
        self._count: dict[tuple[int, int], int] = {}
        self._distinct: dict[int, int] = {}

    def distinct(self, slot: int) -> int:
        """Distinct blocks active on the worker in ``slot``."""
        return self._distinct.get(slot, 0)

    def add(self, slot: int, hashes: Sequence[int]) -> int:
        """A request holding ``hashes`` starts on ``slot``; returns the slot's new distinct count."""
        bit = 1 << slot
        mask, count = self._mask, self._count
        new = 0
        for h in hashes:
            k = (h, slot)
            n = count.get(k, 0)
            count[k] = n + 1
            if n == 0:
                mask[h] = mask.get(h, 0) | bit
                new += 1
        d = self._distinct.get(slot, 0) + new
        self._distinct[slot] = d
        return d

    def remove(self, slot: int, hashes: Sequence[int]) -> int:
        """The request holding ``hashes`` on ``slot`` ended; returns the slot's new distinct count."""
        bit = 1 << slot
        mask, count = self._mask, self._count
        gone = 0
        for h in hashes:
            k = (h, slot)
            n = count.get(k, 0)
            if n <= 1:
                if n == 1:
                    del count[k]
                    m = mask.get(h, 0) & ~bit
                    if m:
                        mask[h] = m
                    else:
                        mask.pop(h, None)
                    gone += 1
            else:
                count[k] = n - 1
        d = self._distinct.get(slot, 0) - gone
        if d:
            self._distinct[slot] = d
        else:
            self._distinct.pop(slot, None)
        return d

    def forget(self, slot: int) -> None:
        """Drop every entry of one slot (worker removed)."""
        bit = ~(1 << slot)
        for k in [k for k in self._count if k[1] == slot]:
            del self._count[k]
            h = k[0]
            m = self._mask.get(h, 0) & bit
            if m:
                self._mask[h] = m
            else:
                self._mask.pop(h, None)
        self._distinct.pop(slot, None)

    def match(self, hashes: Sequence[int]) -> dict[int, int]:
        """{slot: n} -- the first ``n >= 1`` blocks of ``hashes`` are active on that slot."""
        if not hashes:
            return {}
        return chain_depths(self._mask.get, hashes)

    def check_invariants(self) -> None:
        """Masks, counts and distinct totals agree (tests call this after every step)."""
        per_slot: dict[int, int] = {}
        for (h, slot), n in self._count.items():
            assert n >= 1, (h, slot, n)
            assert self._mask.get(h, 0) >> slot & 1, (h, slot)
            per_slot[slot] = per_slot.get(slot, 0) + 1
        for h, m in self._mask.items():
            assert m, h
            s = m
            while s:
                low = s & -s
                assert (h, low.bit_length() - 1) in self._count, (h, low)
                s ^= low
        assert per_slot == self._distinct, (per_slot, self._distinct)
