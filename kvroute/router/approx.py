"""Approximate cache entries: what a worker is *predicted* to hold, from routing decisions alone.

For engines that publish no KV events (and for event streams marked stale),
the router predicts each worker's prefix cache from its own decisions, as
Dynamo's approximate mode (``--no-kv-events``: a radix tree fed by routed
requests, entries expiring after a TTL) and llm-d's approximate prefix-cache
scorer (an LRU of routed prefixes per pod, bounded per pod) do:

* a routed prompt's whole chain is recorded for the chosen worker with an
  expiry ``now + ttl_s`` (re-routing a prefix refreshes it);
* each worker keeps at most ``capacity`` blocks (its configured KV capacity,
  or ``default_capacity``), the least recently routed going first -- the
  engine's own LRU eviction, approximated;
* entries expire after ``ttl_s`` (the engine has probably evicted them).

Layout (private; only :class:`ApproxPrefixes` methods touch it)::

    _mask : MASK_SHARDS dicts, by the hash's low bits: {content hash -> bitmask of worker
            slots predicted to hold it}
    _lru  : {slot -> _SlotLRU {content hash -> expiry}}, oldest first

Why shards: a dict of a few hundred thousand keys that keeps gaining and losing keys (the LRU bound
at work) now and then rebuilds its whole table in one insert, 10-20 ms holding the router's lock
and the GIL (issue 17, item 9: measured 20 ms for one 256-block add beside maximal prompts);
a shard rebuilds 1/MASK_SHARDS of it.  Each slot's LRU is split the same way (:class:`_SlotLRU`: an
ordered run of small buckets), for the same reason: one OrderedDict of 65,536 churning entries took
5-7 ms to rebuild.

Every entry has the same TTL, so each slot's LRU order is also its expiry
order: expiry pops from the front.  Matching walks the prompt's chained
hashes AND-ing masks, as :meth:`kvroute.KVIndex.match` does: a slot's depth
is where its bit stops.  A hole (a parent evicted before its child) only
shortens a match, never lengthens it.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Callable, Iterable, Iterator, Sequence

from .masks import chain_depths

#: Default entry lifetime.  Dynamo's approximate mode defaults to 120 s; chosen here on the Mooncake
#: synthetic trace (kvroute sim --approximate, 8 workers, first 2,000 requests): with the per-worker
#: bound at GPU + host blocks, TTL 120 s found 58% of the exact router's hits, 300 s 93%, 600 s and
#: longer 100% (the capacity bound then does the work); judged on the conversation and agentic traces
#: in docs/replicas.md.  The TTL still guards against evictions the router cannot see.
DEFAULT_APPROX_TTL_S = 600.0
#: Blocks kept per worker when its KV capacity is unknown.
DEFAULT_APPROX_CAPACITY = 1 << 16
#: Dicts the hash -> slots masks are split into (module docstring); a power of two.
MASK_SHARDS = 256
_SHARD = MASK_SHARDS - 1


class _SlotLRU:
    """One slot's ``{hash: expiry}`` in LRU order, as the subset of ``OrderedDict`` the table uses
    (``in``, ``[]``, ``del``, ``move_to_end``, ``popitem(last=False)``, ordered iteration), kept in
    buckets of at most ``BUCKET`` entries (small OrderedDicts, oldest bucket first) with the bucket of
    each hash in ``LRU_SHARDS`` small dicts: no operation rebuilds more than one small table."""

    BUCKET = 1024
    LRU_SHARDS = 64
    __slots__ = ("_buckets", "_where", "_n")

    def __init__(self) -> None:
        self._buckets: deque[OrderedDict[int, float]] = deque()
        self._where: list[dict[int, OrderedDict[int, float]]] = [{} for _ in range(self.LRU_SHARDS)]
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __contains__(self, h: int) -> bool:
        return h in self._where[h & (self.LRU_SHARDS - 1)]

    def __getitem__(self, h: int) -> float:
        return self._where[h & (self.LRU_SHARDS - 1)][h][h]

    def __setitem__(self, h: int, exp: float) -> None:
        """Set ``h``'s expiry: in place when present, else as the newest entry."""
        where = self._where[h & (self.LRU_SHARDS - 1)]
        b = where.get(h)
        if b is not None:
            b[h] = exp
            return
        bs = self._buckets
        if not bs or len(bs[-1]) >= self.BUCKET:
            bs.append(OrderedDict())
        b = bs[-1]
        b[h] = exp
        where[h] = b
        self._n += 1

    def __delitem__(self, h: int) -> None:
        b = self._where[h & (self.LRU_SHARDS - 1)].pop(h)
        del b[h]
        self._n -= 1
        if not b:
            self._drop(b)

    def move_to_end(self, h: int) -> None:
        where = self._where[h & (self.LRU_SHARDS - 1)]
        b = where[h]
        newest = self._buckets[-1]
        if b is newest:
            b.move_to_end(h)
            return
        exp = b.pop(h)
        if not b:
            self._drop(b)
        if len(newest) >= self.BUCKET:
            newest = OrderedDict()
            self._buckets.append(newest)
        newest[h] = exp
        where[h] = newest

    def popitem(self, last: bool = True) -> tuple[int, float]:
        """The oldest entry, removed (``last=False`` only: the table never pops the newest)."""
        assert not last, "only the oldest entry is ever popped"
        b = self._buckets[0]
        h, exp = b.popitem(last=False)
        del self._where[h & (self.LRU_SHARDS - 1)][h]
        self._n -= 1
        if not b:
            self._buckets.popleft()
        return h, exp

    def first(self) -> int:
        return next(iter(self._buckets[0]))

    def last_value(self) -> float:
        b = self._buckets[-1]
        return b[next(reversed(b))]

    def __iter__(self) -> Iterator[int]:
        for b in self._buckets:
            yield from b

    def items(self) -> Iterator[tuple[int, float]]:
        for b in self._buckets:
            yield from b.items()

    def _drop(self, b: OrderedDict[int, float]) -> None:
        """Remove the (empty) bucket ``b`` from the run (identity, not equality: empty dicts are equal)."""
        bs = self._buckets
        if bs[0] is b:
            bs.popleft()
        elif bs[-1] is b:
            bs.pop()
        else:
            for i, x in enumerate(bs):
                if x is b:
                    del bs[i]
                    return


class ApproxPrefixes:
    """Per-worker predicted block chains with a TTL and an LRU capacity bound (module docstring)."""

    def __init__(self, ttl_s: float = DEFAULT_APPROX_TTL_S, clock: Callable[[], float] | None = None,
                 default_capacity: int = DEFAULT_APPROX_CAPACITY) -> None:
        if not ttl_s > 0:
            raise ValueError(f"approximate TTL must be > 0, got {ttl_s!r}")
        if default_capacity < 1:
            raise ValueError("default_capacity must be >= 1")
        #: Seconds an entry lives after the decision that last routed it.
        self.ttl_s = ttl_s
        #: Blocks per slot when :meth:`add` is given no capacity.
        self.default_capacity = default_capacity
        self._clock = clock
        self._mask: list[dict[int, int]] = [{} for _ in range(MASK_SHARDS)]
        #: Keys over all mask shards (``match`` returns early when 0).
        self._keys = 0
        self._lru: dict[int, _SlotLRU] = {}
        #: Entries dropped by the capacity bound and by the TTL (counters; metrics read them).
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        """(block, slot) entries held."""
        return sum(len(d) for d in self._lru.values())

    def entries(self, slot: int) -> int:
        d = self._lru.get(slot)
        return len(d) if d else 0

    def add(self, slot: int, hashes: Sequence[int], now: float, *, capacity: int | None = None,
            expires_at: float | None = None) -> None:
        """Record ``hashes`` (a routed chain, root first) as held by ``slot`` until ``expires_at``
        (default ``now + ttl_s``), then enforce the slot's capacity (oldest entries go)."""
        if not hashes:
            return
        exp = now + self.ttl_s if expires_at is None else expires_at
        if exp <= now:
            return
        d = self._lru.get(slot)
        if d is None:
            d = self._lru[slot] = _SlotLRU()
        self._expire_slot(slot, d, now)
        bit = 1 << slot
        shards = self._mask
        if d:
            # a late entry (another replica's message, a catch-up copy) must not break the expiry order:
            # it lives as long as the freshest entry (an extension bounded by the sync delay)
            last = d.last_value()
            if exp < last:
                exp = last
        for h in hashes:
            if h in d:
                d.move_to_end(h)
            else:
                mask = shards[h & _SHARD]
                m = mask.get(h, 0)
                if not m:
                    self._keys += 1
                mask[h] = m | bit
            d[h] = exp
        cap = capacity or self.default_capacity
        while len(d) > cap:
            h, _ = d.popitem(last=False)
            self._unset(h, bit)
            self.evicted += 1

    def _unset(self, h: int, bit: int) -> None:
        mask = self._mask[h & _SHARD]
        m = mask[h] & ~bit
        if m:
            mask[h] = m
        else:
            del mask[h]
            self._keys -= 1

    def _get(self, h: int, default: int = 0) -> int:
        return self._mask[h & _SHARD].get(h, default)

    def _expire_slot(self, slot: int, d: _SlotLRU, now: float) -> None:
        bit = 1 << slot
        while d:
            h = d.first()
            if d[h] > now:
                return
            del d[h]
            self._unset(h, bit)
            self.expired += 1

    def expire(self, now: float) -> None:
        for slot, d in self._lru.items():
            self._expire_slot(slot, d, now)

    def forget(self, slot: int) -> None:
        """Drop every entry of ``slot`` (worker removed, or back to an exact index)."""
        d = self._lru.pop(slot, None)
        if not d:
            return
        bit = 1 << slot
        for h in d:
            self._unset(h, bit)

    def match(self, hashes: Sequence[int], now: float) -> dict[int, int]:
        """{slot: depth >= 1} of the longest predicted prefix of ``hashes`` per slot (expired entries skipped)."""
        if not hashes or not self._keys:
            return {}
        live = self._get(hashes[0])
        if not live:
            return {}
        # an expired entry still in the table (a slot not touched since) must not count
        for slot, d in self._lru.items():
            if live >> slot & 1:
                self._expire_slot(slot, d, now)
        return chain_depths(self._get, hashes)  # every depth >= 1: the slots of the first block's mask

    def dump(self, slot: int, now: float) -> list[tuple[int, float]]:
        """``(hash, seconds left)`` of a slot's live entries, oldest first (a peer's catch-up copy)."""
        d = self._lru.get(slot)
        if not d:
            return []
        self._expire_slot(slot, d, now)
        return [(h, e - now) for h, e in d.items()]

    def load(self, slot: int, entries: Iterable[tuple[int, float]], now: float, capacity: int | None = None) -> None:
        """Add a peer's :meth:`dump` (oldest first), keeping each entry's remaining lifetime."""
        for h, left in entries:
            self.add(slot, (h,), now, capacity=capacity, expires_at=now + left)

    def check_invariants(self) -> None:
        """Masks equal the union of slot tables; no empty mask; each slot's expiries never decrease."""
        want: dict[int, int] = {}
        for slot, d in self._lru.items():
            prev = float("-inf")
            for h, e in d.items():
                want[h] = want.get(h, 0) | 1 << slot
                assert e >= prev, "approximate entries out of expiry order"
                prev = e
        have = {h: m for shard in self._mask for h, m in shard.items()}
        assert want == have, "approximate masks drifted from the slot tables"
        assert self._keys == len(have), "approximate key count drifted"
        assert all(h & _SHARD == k for k, shard in enumerate(self._mask) for h in shard), "a mask in the wrong shard"
