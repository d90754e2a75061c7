"""Shadow caches for set dueling: a :class:`TieredCache` that reports what it adds and drops.

:class:`~kvroute.eviction.policies.adaptive.Adaptive` duels expert policies on
shadow caches that serve every request on their own (no engine, no events).
The host tier of a two-tier cache then keeps the real cache's contents close
to the leading shadow's: it drops first the blocks that shadow has dropped, so
GPU + host together hold what one cache of their summed size run by the
leading expert would hold.  For that it must hear of every block a shadow adds
or drops, which this subclass reports through two callbacks.

A shadow is GPU-only (one tier): a block leaves it only through
``TieredCache._remove`` (an eviction drops the victim's subtree block by
block), and enters it only through ``TieredCache._add``; those are the two
methods overridden here.  The exception is ``clear()`` (the real cache was
reset), which reports nothing: its owner then calls :meth:`Votes.rebuild`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

from .base import EvictionPolicy
from .tiered import TieredCache


class ShadowCache(TieredCache):
    """A one-tier :class:`TieredCache` that calls ``on_add(key)`` / ``on_drop(key)`` after each change."""

    def __init__(
        self,
        capacity: int,
        policy: EvictionPolicy,
        on_add: Callable[[Hashable], None],
        on_drop: Callable[[Hashable], None],
    ) -> None:
        super().__init__(capacity, 0, policy)
        #: Called with each key this cache adds; set once here, read only by _add.
        self._on_add = on_add
        #: Called with each key this cache drops; set once here, read only by _remove.
        self._on_drop = on_drop

    def _add(self, k, p, d, t, now) -> None:  # noqa: D401 - see TieredCache._add
        super()._add(k, p, d, t, now)
        self._on_add(k)

    def _remove(self, k) -> None:
        super()._remove(k)
        self._on_drop(k)


class Votes:
    """Which of a duel's shadow caches hold each candidate of one real tier, and the drop order that follows.

    Every candidate carries a bitmask of the shadows that do *not* hold it.  The
    tier drops first the candidates the leading expert's shadow has dropped, and
    among those the ones the other experts' shadows have dropped too; then the
    ones the leader holds but others have dropped (the leader must give up some
    block it holds: the others' votes pick which).  A candidate every shadow
    holds gets no level here: the leader's own ordering picks among those.
    Within a level, the candidate that got there first goes first (after a
    change of leader, the order in which they became candidates).  Agreeing
    experts thus decide together, and a change of leader (which :meth:`set_leader`
    re-sorts, O(candidates)) moves the cache toward the new leader's contents
    through the blocks they disagree on first.

    All updates are O(1): :meth:`add` / :meth:`discard` (the tier's candidacy),
    :meth:`held` / :meth:`dropped` (a shadow's callbacks).
    """

    def __init__(self, shadows: tuple) -> None:
        #: The shadow caches (fixed); membership is asked with ``key in shadow``.
        self.shadows = shadows
        #: Index of the leading shadow; changed only through set_leader().
        self.leader = 0
        n = len(shadows)
        #: Candidate key -> bitmask of the shadows that do not hold it.
        self._mask: dict[Hashable, int] = {}
        #: Priority levels (higher goes first): 0 unused; 1..n-1 held by the leader, dropped by that many
        #: others; n..2n-1 dropped by the leader and by (level - n) others.  Each keeps arrival order.
        self._levels = [OrderedDict() for _ in range(2 * n)]
        self._n = n

    def _prio(self, m: int) -> int:
        lead = 1 << self.leader
        others = bin(m & ~lead).count("1")
        return self._n + others if m & lead else others

    def __len__(self) -> int:
        return len(self._mask)

    def add(self, key: Hashable) -> None:
        """``key`` became a candidate of the tier."""
        if key in self._mask:
            return
        m = self._mask[key] = self._mask_of(key)
        p = self._prio(m)
        if p:
            self._levels[p][key] = None

    def discard(self, key: Hashable) -> None:
        """``key`` stopped being a candidate (pinned, gained a child, or left the tier)."""
        m = self._mask.pop(key, None)
        if m is not None:
            p = self._prio(m)
            if p:
                del self._levels[p][key]

    def _move(self, key: Hashable, m: int, new: int) -> None:
        p, q = self._prio(m), self._prio(new)
        self._mask[key] = new
        if p != q:
            if p:
                del self._levels[p][key]
            if q:
                self._levels[q][key] = None

    def held(self, i: int, key: Hashable) -> None:
        """Shadow ``i`` added ``key``."""
        m = self._mask.get(key)
        if m is not None and m >> i & 1:
            self._move(key, m, m & ~(1 << i))

    def dropped(self, i: int, key: Hashable) -> None:
        """Shadow ``i`` dropped ``key``."""
        m = self._mask.get(key)
        if m is not None and not m >> i & 1:
            self._move(key, m, m | 1 << i)

    def _mask_of(self, key: Hashable) -> int:
        """Bitmask of the shadows that do not hold ``key``."""
        return sum(1 << i for i, sh in enumerate(self.shadows) if key not in sh)

    def _refile(self) -> None:
        """Put every candidate in its level again (after the leader or the masks changed), O(candidates)."""
        for lv in self._levels:
            lv.clear()
        for key, m in self._mask.items():
            p = self._prio(m)
            if p:
                self._levels[p][key] = None

    def rebuild(self) -> None:
        """Recompute every candidate's mask from the shadows (after a shadow changed without reporting
        it, such as a clear()), and the levels with them."""
        for key in self._mask:
            self._mask[key] = self._mask_of(key)
        self._refile()

    def set_leader(self, leader: int) -> None:
        """Follow shadow ``leader`` from now on (re-sorts every candidate)."""
        if leader == self.leader:
            return
        self.leader = leader
        self._refile()

    def victim(self) -> Hashable | None:
        """The candidate to drop first, or None when every shadow holds every candidate."""
        for lv in reversed(self._levels):
            if lv:
                return next(iter(lv))
        return None

    def holds(self, key: Hashable) -> bool:
        """Whether the leading shadow holds ``key`` (an admission test)."""
        return key in self.shadows[self.leader]

    def check_invariants(self) -> None:
        """Every candidate's mask matches the shadows, and it sits in exactly its level."""
        seen = 0
        for key, m in self._mask.items():
            want = sum(1 << i for i, sh in enumerate(self.shadows) if key not in sh)
            assert m == want, (key, m, want)
            p = self._prio(m)
            if p:
                assert key in self._levels[p], key
                seen += 1
        assert seen == sum(len(lv) for lv in self._levels)
