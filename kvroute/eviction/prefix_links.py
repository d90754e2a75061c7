"""Prefix relations among resident blocks: key -> parent, parent -> children, leaves.

Leaves-first eviction needs to know, for every resident block, its parent and
whether any resident block extends it.  :class:`PrefixLinks` keeps exactly that
and nothing else (no tiers, pins, candidates or policy calls: those stay with
the caller).  Its users: :class:`kvroute.eviction.TieredCache` (both tiers, and
so the duel's shadow caches), and the vLLM adapters
:class:`kvroute.adapters.vllm_plugin.PolicyFreeQueue` (GPU block pool) and
:class:`kvroute.adapters.vllm_cache_policy.KVRouteCachePolicy` (CPU offload tier).

Map of the parts:

* ``add(key, parent)`` -- ``key`` becomes resident under ``parent`` (None: a
  chain's start, or not known yet);
* ``link(key, parent)`` -- give a resident key whose parent is absent or unknown
  a (new) parent;
* ``unlink(key)`` -- ``key`` leaves; returns its parent when that parent just
  became a leaf (the caller may offer it as an eviction candidate);
* ``parent(key)``, ``parents`` (the live key -> parent map, read-only),
  ``is_leaf(key)``, ``children(key)``, ``len``, ``in``,
  ``clear()``, ``check_invariants()``.

Every operation is O(1) (``clear`` and ``check_invariants`` aside): removing a
parent does not touch its children.

The orphan rule (one rule for every user)
-----------------------------------------
Keys are chained content hashes (vLLM's block hashes; the CPU tier's offload
keys are a block hash plus a KV-cache group index): a key's parent is a fact of
its content, not of what happens to be resident.  So a child **remembers its
parent's key** when the parent leaves.  While the parent is absent the link is
asleep: ``parent(child)`` is None and the parent's departure makes no one a
leaf.  When a block with that key is added again, every resident child that
remembers it is linked to it at once (in O(1): the children's set is kept
under the parent's key and simply wakes up), and the re-added parent is not a
leaf while they are resident.  A child whose parent is absent (or was never
known) may be **re-pointed** by ``link``; a child whose parent is resident
keeps it (first link wins; ``link`` to another resident parent is an error).

Why this rule and not "orphans become roots" or "orphans are forgotten":

* vLLM's GPU pool can hold a child ``C`` whose parent block ``P`` was evicted
  (a fallback eviction, or a connector's ``evict_blocks``) and later re-cached
  when a request recomputes it under the same hash.  vLLM's prefix lookup then
  reaches ``C`` through ``P`` again, so ``P`` must not be evicted before ``C``
  (leaves first); a rule that left ``C`` a root would offer ``P`` as a leaf and
  strand ``C`` again.
* The CPU tier learns relations after the fact, from the request's keys in
  order (``on_request_finished``), and walks keys in prefix order on lookup:
  a chunk is useless without its predecessor.  Re-linking on re-store protects
  the predecessor at once instead of at the end of the next request, and
  re-pointing keeps the old behaviour (an orphan is linked to whichever
  resident predecessor a later request names).

Memory stays bounded by the resident keys: a remembered link lives in the
child's entry and in its (absent) parent's child set, and both go when the
child goes.  Callers must not build cycles (chained hashes cannot);
``check_invariants`` detects them.
"""
from __future__ import annotations

from collections.abc import Hashable
from collections.abc import Set as AbstractSet

from .base import EvictionError

__all__ = ["PrefixLinkError", "PrefixLinks"]

_NONE: frozenset = frozenset()


class PrefixLinkError(EvictionError, KeyError):
    """A :class:`PrefixLinks` call that breaks its rules (unknown key, key added twice,
    a second resident parent, a key as its own parent)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "prefix link error"


class PrefixLinks:
    """Parent/children bookkeeping of resident blocks (see the module docstring).

    One instance per cache (tier); only its owner calls it.
    """

    __slots__ = ("_children", "_parent")

    def __init__(self) -> None:
        #: Every resident key -> its parent's key (None: chain start / not known).  The parent may
        #: be absent (an orphan remembering it).  Written only by add/link/unlink/clear.
        self._parent: dict[Hashable, Hashable | None] = {}
        #: Parent key (resident or absent) -> the resident keys naming it in ``_parent``; only
        #: non-empty sets.  Written only by add/link/unlink/clear; ``children`` hands out views.
        self._children: dict[Hashable, set] = {}

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._parent)

    def __contains__(self, key: object) -> bool:
        return key in self._parent

    def parent(self, key: Hashable) -> Hashable | None:
        """The resident parent of resident ``key`` (None: a root, or its parent is absent)."""
        try:
            p = self._parent[key]
        except KeyError:
            raise PrefixLinkError(f"{key!r} is not resident") from None
        return p if p in self._parent else None

    def is_leaf(self, key: Hashable) -> bool:
        """True when no resident key has ``key`` as its parent (resident or not)."""
        return key not in self._children

    @property
    def parents(self) -> "dict[Hashable, Hashable | None]":
        """Every resident key -> the key of its parent (None: a chain's start or not known; the parent may
        be absent, see the orphan rule): the live mapping, for hot loops (read it, never write it)."""
        return self._parent

    def children(self, key: Hashable) -> AbstractSet:
        """The resident keys whose parent is ``key``: a live read-only view (do not mutate)."""
        return self._children.get(key, _NONE)

    # ---------------------------------------------------------------- mutations
    def add(self, key: Hashable, parent: Hashable | None = None) -> Hashable | None:
        """``key`` becomes resident under ``parent`` (None: none or not known yet).

        Resident children remembering ``key`` are linked to it again.  Returns
        ``parent`` when it is resident and just stopped being a leaf, else None.
        """
        if key is None or key in self._parent:
            raise PrefixLinkError(f"{key!r} is already resident" if key is not None else "a key cannot be None")
        if parent is not None and parent == key:
            raise PrefixLinkError(f"{key!r} cannot be its own parent")
        self._parent[key] = None
        return self._attach(key, parent)

    def link(self, key: Hashable, parent: Hashable) -> Hashable | None:
        """Give resident ``key`` the parent ``parent`` (first link wins, see the orphan rule).

        A no-op when ``parent`` already is its resident parent; re-points a key
        whose parent is absent or unknown.  Returns ``parent`` when it is
        resident and just stopped being a leaf, else None.
        """
        try:
            old = self._parent[key]
        except KeyError:
            raise PrefixLinkError(f"{key!r} is not resident") from None
        if parent is None or parent == key:
            raise PrefixLinkError(f"{key!r} cannot be linked to {parent!r}")
        if old == parent:
            return None
        if old is not None:
            if old in self._parent:
                raise PrefixLinkError(f"{key!r} already has the resident parent {old!r}, not {parent!r}")
            self._detach(key, old)
        return self._attach(key, parent)

    def unlink(self, key: Hashable) -> Hashable | None:
        """``key`` leaves.  Its children remember it (orphan rule).  Returns its parent
        when that parent is resident and just became a leaf, else None."""
        try:
            p = self._parent.pop(key)
        except KeyError:
            raise PrefixLinkError(f"{key!r} is not resident") from None
        if p is not None and self._detach(key, p) and p in self._parent:
            return p
        return None

    def clear(self) -> None:
        """Forget every key (remembered links too)."""
        self._parent.clear()
        self._children.clear()

    # ---------------------------------------------------------------- internals
    def _attach(self, key: Hashable, parent: Hashable | None) -> Hashable | None:
        if parent is None:
            return None
        self._parent[key] = parent
        s = self._children.get(parent)
        if s is None:
            self._children[parent] = {key}
            return parent if parent in self._parent else None
        s.add(key)
        return None

    def _detach(self, key: Hashable, parent: Hashable) -> bool:
        """Take ``key`` out of ``parent``'s child set; True when the set is now empty."""
        s = self._children[parent]
        s.discard(key)
        if s:
            return False
        del self._children[parent]
        return True

    def check_invariants(self) -> None:
        """Raise AssertionError when the two maps disagree or links form a cycle."""
        par, kids = self._parent, self._children
        linked = 0
        for k, p in par.items():
            if p is not None:
                assert p != k, f"{k!r} is its own parent"
                assert k in kids.get(p, _NONE), f"{k!r} missing from its parent {p!r}'s children"
                linked += 1
        n = 0
        for p, s in kids.items():
            assert s, f"empty child set kept for {p!r}"
            for c in s:
                assert c in par and par[c] == p, f"{c!r} listed under {p!r} but its parent is {par.get(c)!r}"
            n += len(s)
        assert n == linked, (n, linked)
        done: set = set()
        for k in par:  # walk each chain of resident links once
            path: list = []
            on_path: set = set()
            x = k
            while x in par and x not in done:
                assert x not in on_path, f"cycle through {x!r}"
                on_path.add(x)
                path.append(x)
                x = par[x]
            done.update(path)
