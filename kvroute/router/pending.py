"""Speculative prefixes: blocks a routing decision says a worker *will* hold.

Between a routing decision and the engine's ``BlockStored`` event there is a
window (queueing + prefill + the event's trip) in which the exact index does not
know the worker is computing the prompt.  Without this table, a burst of
requests sharing a new prefix sees no cache anywhere and scatters (each copy
recomputes the prefix).  llm-d keeps such speculative entries for 2 s
(BRIEF section 4); Dynamo's approximate mode inserts on each decision with a
120 s TTL.  This table is kept apart from the exact :class:`KVIndex`, so the
index only ever holds what engines announced.

Layout (private; only :class:`PendingPrefixes` touches it)::

    _cur, _prev : {content hash -> bitmask of worker slots}   two generations
    _n_cur, _n_prev : number of set (block, slot) bits in each generation
    _epoch      : floor(clock / ttl_s) of the current generation

Time is cut into epochs of ``ttl_s``.  Decisions go into ``_cur``; when the
clock enters the next epoch, ``_cur`` becomes ``_prev`` and the old ``_prev``
is dropped whole (two epochs later both are).  A lookup sees both, so an
entry added at ``t`` lives more than ``ttl_s`` and at most ``2 * ttl_s`` -- expiry
is O(1), not a walk over every entry (this is the router's hot path).

A routed prompt's *whole* chain is added, so a worker's pending depth alone
covers the prompt; the overlap the router uses is ``max(index depth, pending
depth)``.  Entries leave with their generation (the engine's events have by
then confirmed them, or they were wrong) or when the worker is forgotten.
"""
from __future__ import annotations

from typing import Callable, Sequence


class PendingPrefixes:
    """Per-worker speculative block chains with a TTL, matched like the index."""

    def __init__(self, ttl_s: float, clock: Callable[[], float]) -> None:
        if ttl_s < 0:
            raise ValueError("pending TTL must be >= 0")
        #: Minimum lifetime of an entry, seconds (maximum: twice this); 0 disables the table.
        self.ttl_s = ttl_s
        self._clock = clock
        self._cur: dict[int, int] = {}
        self._prev: dict[int, int] = {}
        self._n_cur = 0
        self._n_prev = 0
        self._epoch = int(clock() // ttl_s) if ttl_s > 0 else 0
        #: Generations dropped by expire(), freed by reap() outside the router's lock.
        self._dead: list[dict[int, int]] = []

    def __len__(self) -> int:
        """Number of (block, worker) pending entries, summed over the two generations (a pair
        in both counts twice); O(1), because metrics read it under the routing lock."""
        return self._n_cur + self._n_prev

    def expire(self, now: float | None = None) -> None:
        """Rotate generations whose time has come (epochs of ``ttl_s`` on the clock)."""
        if self.ttl_s == 0:
            return
        if now is None:
            now = self._clock()
        epoch = int(now // self.ttl_s)
        if epoch == self._epoch:
            return
        # a dropped generation is kept until reap(): freeing a dict of millions of entries takes tens of
        # ms, which would be spent under the router's lock (issue 17, item 9); at most two wait
        if epoch == self._epoch + 1:
            self._bury(self._prev)
            self._prev, self._n_prev = self._cur, self._n_cur
        else:  # two or more epochs passed (or the clock went back): everything is old
            self._bury(self._prev)
            self._bury(self._cur)
            self._prev, self._n_prev = {}, 0
        self._cur, self._n_cur = {}, 0
        self._epoch = epoch

    def _bury(self, gen: dict[int, int]) -> None:
        if gen:
            self._dead.append(gen)
            if len(self._dead) > 2:
                del self._dead[0]  # reap() was not called: the oldest is freed here

    def reap(self) -> int:
        """Free the generations :meth:`expire` dropped; the router calls it with its lock released.
        Returns how many were freed."""
        dead, self._dead = self._dead, []
        n = len(dead)
        del dead
        return n

    def dead_len(self) -> int:
        """Entries of dropped generations not freed yet."""
        return sum(len(g) for g in self._dead)

    def add(self, slot: int, hashes: Sequence[int]) -> None:
        """Mark a routed prompt's chain as pending on the worker in ``slot``."""
        self.add_range(slot, hashes, 0, len(hashes))

    def add_range(self, slot: int, hashes: Sequence[int], start: int, stop: int) -> int:
        """Add ``hashes[start:stop]`` of a chain whose ``hashes[:start]`` earlier calls added (the router
        adds a long chain in chunks, releasing its lock between them).  Returns where the next call
        continues: ``stop`` (``len(hashes)`` when ``start`` is 0 and the whole chain is already pending),
        or 0, adding nothing, when ``hashes[start - 1]`` is no longer in the current generation for
        ``slot`` (rotated out, or the slot forgotten): the caller restarts from 0, so each generation
        stays prefix-closed per slot, which :func:`_walk` relies on."""
        n = len(hashes)
        if not n or self.ttl_s == 0:
            return n
        self.expire()
        bit = 1 << slot
        cur = self._cur
        get = cur.get
        if start == 0:
            if get(hashes[-1], 0) & bit:
                return n  # the whole chain is already pending in this generation (chained hashes)
        elif not get(hashes[start - 1], 0) & bit:
            return 0
        stop = min(stop, n)
        added = 0
        for i in range(start, stop):
            h = hashes[i]
            m = get(h, 0)
            if not m & bit:
                cur[h] = m | bit
                added += 1
        self._n_cur += added
        return stop

    def chain(self, hashes: Sequence[int]) -> Sequence[int]:
        """``hashes`` in the form :meth:`add_range` takes (the compiled table converts them once)."""
        return hashes

    def forget(self, slot: int) -> None:
        """Drop every pending entry of one worker slot (worker removed)."""
        nb = ~(1 << slot)
        dropped = []
        for gen in (self._cur, self._prev):
            hs = [h for h, m in gen.items() if m >> slot & 1]
            for h in hs:
                m = gen[h] & nb
                if m:
                    gen[h] = m
                else:
                    del gen[h]
            dropped.append(len(hs))
        self._n_cur -= dropped[0]
        self._n_prev -= dropped[1]

    def match(self, hashes: Sequence[int]) -> dict[int, int]:
        """{slot: depth} of the longest pending prefix of ``hashes`` per worker slot (depth >= 1).

        Each generation is walked on its own: a prompt's whole chain always
        lands in one generation, so the per-slot maximum is exact.
        """
        if not hashes:
            return {}
        self.expire()
        out = _walk(self._cur, hashes)
        if self._prev:
            for slot, d in _walk(self._prev, hashes).items():
                if d > out.get(slot, 0):
                    out[slot] = d
        return out

    def check_invariants(self) -> None:
        """No empty masks are kept; the pair counters equal the set bits of each generation."""
        for gen, n in ((self._cur, self._n_cur), (self._prev, self._n_prev)):
            for h, m in gen.items():
                assert m, f"empty pending mask kept for {h:#x}"
            assert n == sum(bin(m).count("1") for m in gen.values()), "pending pair counter drifted"


def _walk(table: dict[int, int], hashes: Sequence[int]) -> dict[int, int]:
    """{slot: depth} in one generation, by bisection.

    Pending chains are added whole, so within a generation "slot holds block i"
    implies it holds blocks 0..i-1 (equal chained hash = equal prefix): a slot's
    depth is where its bit stops, found by halving the range the bits of a
    group of slots stop in.  Cost: O(distinct depths x log(blocks)) lookups,
    instead of one lookup per block.
    """
    get = table.get
    n = len(hashes)
    m0 = get(hashes[0], 0)
    if not m0:
        return {}
    depth: dict[int, int] = {}
    full = get(hashes[n - 1], 0) & m0 if n > 1 else m0
    mm = full
    while mm:
        low = mm & -mm
        depth[low.bit_length() - 1] = n
        mm ^= low
    # each item: (lo, hi, S) -- S holds block lo and not block hi, so its last block lies in [lo, hi-1]
    stack = [(0, n - 1, m0 & ~full)] if n > 1 else []
    while stack:
        lo, hi, S = stack.pop()
        if not S:
            continue
        if hi - lo == 1:
            while S:
                low = S & -S
                depth[low.bit_length() - 1] = hi
                S ^= low
            continue
        mid = (lo + hi) >> 1
        at_mid = get(hashes[mid], 0) & S
        stack.append((lo, mid, S & ~at_mid))
        stack.append((mid, hi, at_mid))
    return depth
