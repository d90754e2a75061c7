"""The exact multi-worker, multi-tier KV index.

Layout (all fields private; only :class:`KVIndex` methods touch them)::

    _any    : {content hash -> bitmask of workers holding it on any tier}
    _tiers  : {content hash -> [gpu mask, host mask, disk mask]}
              only for blocks that some worker holds off the GPU; for every
              other block the GPU mask *is* the ``_any`` mask.
    _workers: {worker id -> _Worker}, each with a bit slot and an alias map
              {engine hash (or the content hash itself) -> content hash}.

Matching a prompt walks its chained hashes once, AND-ing the ``_any`` masks:
a worker leaves the running mask at the first block it lacks, which is its
overlap.  Chaining makes a content hash name its whole prefix, so no tree is
needed; a worker holding block ``i`` without block ``i-1`` (possible when an
engine evicts a parent before a child) simply stops matching at ``i-1``.

Invariants (checked by :meth:`KVIndex.check_invariants`):

1. ``_any[h] != 0`` for every key, and equals the OR of ``_tiers[h]`` when present.
2. ``_tiers[h]`` exists only if its host or disk mask is non-zero.
3. Every set bit belongs to a live worker slot.
4. A worker's alias map holds exactly one entry per content hash it holds.
5. Per-tier entry counters equal the number of set (block, worker, tier) bits.
"""
from __future__ import annotations

import array
import heapq
import operator
import os
import sys
from typing import Any, Iterable, NamedTuple, Sequence

import msgpack
import numpy as np
import xxhash

from .atomic import atomic_write
from .errors import InvalidHashError, SnapshotError, UnknownWorkerError
from .events import (
    INDEXED_SPEC_KINDS,
    AllBlocksCleared,
    ApplyResult,
    BlockRemoved,
    BlockStored,
    EventBatch,
)
from .hashing import HASH_SCHEME_VERSION, ROOT_SEED, tokens_to_bytes
from .hashing import py_block_hash_list as block_hash_list  # the reference hashes with the reference
from .hashing import py_chain_hashes as chain_hashes
from .types import ContentHash, Tier, WorkerId, normalize_engine_hash

_GPU, _HOST, _DISK = int(Tier.GPU), int(Tier.HOST), int(Tier.DISK)
_TIERS = (Tier.GPU, Tier.HOST, Tier.DISK)

SNAPSHOT_MAGIC = b"KVRIDX\r\n"
SNAPSHOT_VERSION = 1
_HEADER_LEN = len(SNAPSHOT_MAGIC) + 4 + 8 + 8


def _content_hashes(hashes: Iterable[Any]) -> list[ContentHash]:
    """Content hashes as a list of Python ints, checked in C to be unsigned 64-bit integers.

    NumPy integer scalars become ints (as keys they would match, but no snapshot could hold them).
    """
    if isinstance(hashes, np.ndarray) and hashes.dtype == np.uint64:
        return hashes.tolist()
    try:
        return array.array("Q", hashes).tolist()  # type: ignore[arg-type]
    except (TypeError, OverflowError, ValueError) as exc:
        raise InvalidHashError(f"content hashes must be integers in [0, 2**64 - 1]: {exc}") from None


def _engine_hash(k: Any) -> Any:
    """An engine hash in its canonical form (see :func:`normalize_engine_hash`); numpy ints accepted."""
    try:
        if not isinstance(k, (int, bytes, bytearray, memoryview)):
            k = operator.index(k)
        return normalize_engine_hash(k)
    except (TypeError, ValueError) as exc:
        raise InvalidHashError(f"bad engine hash {k!r:.40}: {exc}") from None


class Overlap(NamedTuple):
    """How much of a prompt one worker holds, in blocks."""

    #: Longest prefix of the prompt held on any tier.
    total: int
    #: Of those blocks, how many sit on the GPU (a block on several tiers counts in the fastest).
    gpu: int
    #: ... in host memory only (not on the GPU).
    host: int
    #: ... on disk only.
    disk: int


class _Worker:
    """Per-worker state.  Owned by :class:`KVIndex`; nothing else mutates it."""

    __slots__ = ("id", "slot", "bit", "blocks", "groups", "has_engine_keys", "copies")

    def __init__(self, wid: WorkerId, slot: int) -> None:
        #: The user's id of the worker.
        self.id = wid
        #: Bit position of this worker in every mask.
        self.slot = slot
        #: ``1 << slot``.
        self.bit = 1 << slot
        #: Alias map: engine hash (or the content hash when the engine gave none) -> content hash.
        self.blocks: dict[Any, ContentHash] = {}
        #: KV-cache groups whose events this index tracks for the worker (from BlockStored).
        self.groups: set[int | None] = set()
        #: True once any block was stored under an engine hash distinct from its content hash.
        self.has_engine_keys = False
        #: Extra physical copies of a held GPU block, {(engine hash, tier): n}: an engine that
        #: recomputes a cached block (vLLM does for the last block of a fully cached prompt)
        #: announces the same hash again and later removes each copy.  Written only by
        #: :meth:`KVIndex.apply`; sparse (usually empty).
        self.copies: dict[tuple[Any, int], int] = {}


class KVIndex:
    """Which worker holds which block, on which tier (the pure-Python reference backend).

    ``block_size`` (optional) is checked against the ``block_size`` of applied
    events.  ``max_blocks_per_worker`` (optional) bounds memory: stores beyond
    it are refused and counted in ``stats()["capacity_drops"]``.
    """

    #: Which implementation this is (the compiled one is kvroute.kvindex.native.NativeKVIndex).
    backend = "python"

    def __init__(self, block_size: int | None = None, *, max_blocks_per_worker: int | None = None) -> None:
        self.block_size = block_size
        self.max_blocks_per_worker = max_blocks_per_worker
        self._any: dict[ContentHash, int] = {}
        self._tiers: dict[ContentHash, list[int]] = {}
        self._workers: dict[WorkerId, _Worker] = {}
        self._slots: list[_Worker | None] = []
        self._free_slots: list[int] = []
        #: Number of set (block, worker, tier) bits, per tier.
        self._entries = [0, 0, 0]
        #: Stores whose parent the worker did not hold (via :meth:`store`).
        self._orphan_stores = 0
        self._capacity_drops = 0

    # ------------------------------------------------------------------ workers
    def add_worker(self, worker: WorkerId) -> None:
        """Register a worker (idempotent).  ``store`` registers unknown workers itself."""
        self._worker(worker, create=True)

    def workers(self) -> list[WorkerId]:
        return list(self._workers)

    def __contains__(self, worker: object) -> bool:
        return worker in self._workers

    def _worker(self, worker: WorkerId, create: bool = False) -> _Worker:
        w = self._workers.get(worker)
        if w is None:
            if not create:
                raise UnknownWorkerError(f"unknown worker {worker!r}")
            slot = heapq.heappop(self._free_slots) if self._free_slots else len(self._slots)
            w = _Worker(worker, slot)
            if slot == len(self._slots):
                self._slots.append(w)
            else:
                self._slots[slot] = w
            self._workers[worker] = w
        return w

    def remove_worker(self, worker: WorkerId) -> int:
        """Forget a worker and everything it holds; returns the entries dropped."""
        w = self._worker(worker)
        n = self._clear(w)
        del self._workers[worker]
        self._slots[w.slot] = None
        heapq.heappush(self._free_slots, w.slot)
        return n

    def clear(self, worker: WorkerId) -> int:
        """Drop every block of a worker on every tier; returns the entries dropped."""
        return self._clear(self._worker(worker))

    def _clear(self, w: _Worker) -> int:
        b, nb = w.bit, ~w.bit
        any_, tiers, entries = self._any, self._tiers, self._entries
        dropped = 0
        for c in w.blocks.values():
            tm = tiers.get(c)
            if tm is None:
                entries[_GPU] -= 1
                dropped += 1
                m = any_[c] & nb
                if m:
                    any_[c] = m
                else:
                    del any_[c]
            else:
                for t in _TIERS:
                    if tm[t] & b:
                        tm[t] &= nb
                        entries[t] -= 1
                        dropped += 1
                self._settle(c, tm)
        w.blocks.clear()
        w.groups.clear()
        w.copies.clear()
        w.has_engine_keys = False
        return dropped

    # ------------------------------------------------------------ store/remove
    def store(
        self,
        worker: WorkerId,
        hashes: Iterable[int],
        *,
        parent: int | None = None,
        tier: Tier | str = "gpu",
        engine_hashes: Sequence[Any] | None = None,
    ) -> int:
        """Record that ``worker`` holds a chain of blocks on ``tier``.

        ``hashes`` are content hashes in chain order; the first block's parent is
        the content hash ``parent`` (None: the prompt's start).  A parent the
        worker does not hold is counted as an orphan store (the blocks are still
        recorded: their content hashes name their prefix, so they can never be
        matched wrongly, only not at all).  ``engine_hashes``, when given, are
        the engine's names of the same blocks, used by later removals (ints,
        signed ints normalised to their unsigned pattern, or bytes).  Hashes
        that are not unsigned 64-bit integers raise :class:`InvalidHashError`
        before anything changes.  Returns the number of new (block, tier) entries.
        """
        t = int(Tier.parse(tier))
        hs = _content_hashes(hashes)
        if engine_hashes is not None:
            if len(engine_hashes) != len(hs):
                raise ValueError(f"{len(engine_hashes)} engine hashes for {len(hs)} blocks")
            engine_hashes = [_engine_hash(k) for k in engine_hashes]
        if parent is not None:
            parent = _content_hashes([parent])[0]
        w = self._worker(worker, create=True)
        if parent is not None and not (self._any.get(parent, 0) & w.bit):
            self._orphan_stores += 1
        return self._store(w, hs, t, engine_hashes)

    def _store(self, w: _Worker, hs: list, t: int, keys: Sequence[Any] | None) -> int:
        any_, tiers, blocks, entries = self._any, self._tiers, w.blocks, self._entries
        b = w.bit
        limit = self.max_blocks_per_worker
        if t == _GPU and not tiers and limit is None:
            # Hot path (every GPU store while no block sits off the GPU): one dict
            # read and two writes a block; anything unusual falls to the general loop.
            any_get = any_.get
            added = 0
            for i, c in enumerate(hs):
                m = any_get(c, 0)
                k = c if keys is None else keys[i]
                if m & b or k in blocks:  # held, or a name reused for other content
                    break
                any_[c] = m | b if m else b  # share the worker's bit object: saves an int per block
                blocks[k] = c
                added += 1
            else:
                i = len(hs)
            if keys is not None and added:
                w.has_engine_keys = True
            entries[t] += added
            if i == len(hs):
                return added
            return added + self._store_general(w, hs[i:], t, None if keys is None else keys[i:])
        return self._store_general(w, hs, t, keys)

    def _store_general(self, w: _Worker, hs: list, t: int, keys: Sequence[Any] | None) -> int:
        any_, tiers, blocks, entries = self._any, self._tiers, w.blocks, self._entries
        b = w.bit
        limit = self.max_blocks_per_worker
        added = 0
        for i, c in enumerate(hs):
            k = c if keys is None else keys[i]
            m = any_.get(c, 0)
            held = m & b
            if not held:
                if limit is not None and len(blocks) >= limit:
                    self._capacity_drops += len(hs) - i
                    break
                if k in blocks:  # rare: the engine reuses a name for other content; drop the old block
                    self._drop_alias(w, k)
                    m = any_.get(c, 0)
                blocks[k] = c
                if k is not c and k != c:
                    w.has_engine_keys = True
            elif k not in blocks:
                self._realias(w, c, k)
            tm = tiers.get(c)
            if tm is None:
                if t == _GPU:  # fast path: GPU-only block, its GPU mask is the any-mask
                    if not held:
                        any_[c] = m | b if m else b  # share the worker's bit object: saves an int per block
                        added += 1
                    continue
                tm = [m, 0, 0]
                tiers[c] = tm
            if not tm[t] & b:
                tm[t] |= b
                added += 1
            any_[c] = m | b if m else b  # share the worker's bit object: saves an int per block
        entries[t] += added
        return added

    def _drop_alias(self, w: _Worker, k: Any) -> None:
        """Rare path: forget the block that engine hash ``k`` names, on every tier."""
        c = w.blocks[k]
        for t in _TIERS:
            if self._tier_mask(c, int(t)) & w.bit:
                self._remove_one(w, k, c, int(t))

    def _realias(self, w: _Worker, c: ContentHash, k: Any) -> None:
        """Rare path: a held content hash arrives under a new engine hash; keep one alias."""
        if k in w.blocks:  # the new name is taken by other content: that block goes
            self._drop_alias(w, k)
        for old, v in list(w.blocks.items()):
            if v == c:
                del w.blocks[old]
                if w.copies:  # the old name's extra copies go with it (no event can release them now)
                    for t in _TIERS:
                        w.copies.pop((old, int(t)), None)
                break
        w.blocks[k] = c
        w.has_engine_keys = True

    def remove(
        self,
        worker: WorkerId,
        hashes: Iterable[int] | None = None,
        *,
        engine_hashes: Iterable[Any] | None = None,
        tier: Tier | str = "gpu",
    ) -> int:
        """Record that ``worker`` evicted blocks from ``tier``; returns the entries removed.

        Name the blocks by content hash (``hashes``) or by the engine's hashes
        (``engine_hashes``), not both.  Unknown blocks are ignored.
        """
        if (hashes is None) == (engine_hashes is None):
            raise ValueError("give exactly one of hashes or engine_hashes")
        t = int(Tier.parse(tier))
        w = self._worker(worker)
        removed = 0
        if engine_hashes is not None:
            for k in map(_engine_hash, engine_hashes):
                c = w.blocks.get(k)
                if c is not None:
                    removed += self._remove_one(w, k, c, t)
            return removed
        hs = hashes.tolist() if isinstance(hashes, np.ndarray) else hashes
        for c in hs:
            k = self._key_of(w, c)
            if k is not None:
                removed += self._remove_one(w, k, c, t)
        return removed

    def _key_of(self, w: _Worker, c: ContentHash) -> Any:
        if w.blocks.get(c) == c:
            return c
        if not w.has_engine_keys or not (self._any.get(c, 0) & w.bit):
            return None
        for k, v in w.blocks.items():  # rare path: content-hash removal of an engine-keyed block
            if v == c:
                return k
        return None

    def _remove_one(self, w: _Worker, k: Any, c: ContentHash, t: int) -> int:
        any_, tiers = self._any, self._tiers
        b = w.bit
        if w.copies:
            w.copies.pop((k, t), None)
        tm = tiers.get(c)
        if tm is None:
            if t != _GPU:
                return 0
            m = any_[c] & ~b
            if m:
                any_[c] = m
            else:
                del any_[c]
            del w.blocks[k]
            self._entries[_GPU] -= 1
            return 1
        if not tm[t] & b:
            return 0
        tm[t] &= ~b
        self._entries[t] -= 1
        if not self._settle(c, tm) & b:
            del w.blocks[k]
        return 1

    def _settle(self, c: ContentHash, tm: list[int]) -> int:
        """After bits left the tier masks ``tm`` of block ``c``: keep invariants 1-2; returns its any-mask."""
        m = tm[0] | tm[1] | tm[2]
        if not (tm[1] or tm[2]):
            del self._tiers[c]
        if m:
            self._any[c] = m
        else:
            del self._any[c]
        return m

    def content_hash_of(self, worker: WorkerId, engine_hash: Any) -> ContentHash | None:
        """The content hash a worker's engine hash stands for, or None."""
        w = self._workers.get(worker)
        if w is None:
            return None
        try:
            return w.blocks.get(_engine_hash(engine_hash))
        except InvalidHashError:
            return None

    # ------------------------------------------------------------------ events
    def apply(self, worker: WorkerId, batch: EventBatch | Iterable[Any]) -> ApplyResult:
        """Apply one decoded engine batch (or a list of events) from ``worker``.

        Content hashes are computed from each ``BlockStored``'s tokens, chained on
        the content hash of its parent (resolved through the worker's alias map).
        A stored event whose parent, or placeholder block, the worker never
        announced is an *orphan*: it is not applied (its content hashes cannot be
        known) and is counted, so the caller can resync the worker.
        """
        res = ApplyResult()
        w = self._worker(worker, create=True)
        events = batch.events if isinstance(batch, EventBatch) else batch
        for ev in events:
            if isinstance(ev, BlockStored):
                self._apply_stored(w, ev, res)
            elif isinstance(ev, BlockRemoved):
                if ev.group_idx is not None and ev.group_idx not in w.groups:
                    res.ignored += 1
                    continue
                t = int(ev.tier)
                blocks, any_, tiers, copies = w.blocks, self._any, self._tiers, w.copies
                nb = ~w.bit
                gpu_only = 0
                for k in ev.block_hashes:
                    c = blocks.get(k)
                    if copies and (k, t) in copies:  # one of several physical copies goes; the block stays
                        n = copies.pop((k, t))
                        if n > 1:
                            copies[(k, t)] = n - 1
                        res.copies_released += 1
                    elif c is None:
                        res.unknown_removed += 1
                    elif t == _GPU and (not tiers or c not in tiers):
                        # hot path: a GPU-only block, whose GPU mask is its any-mask
                        m = any_[c] & nb
                        if m:
                            any_[c] = m
                        else:
                            del any_[c]
                        del blocks[k]
                        gpu_only += 1
                    elif self._remove_one(w, k, c, t):
                        res.removed += 1
                    else:
                        res.unknown_removed += 1
                self._entries[_GPU] -= gpu_only
                res.removed += gpu_only
            elif isinstance(ev, AllBlocksCleared):
                res.cleared += self._clear(w)
            else:
                raise TypeError(f"not a KV event: {type(ev).__name__}")
        return res

    def _apply_stored(self, w: _Worker, ev: BlockStored, res: ApplyResult) -> None:
        if ev.spec_kind is not None and ev.spec_kind not in INDEXED_SPEC_KINDS:
            res.ignored += 1
            return
        t = int(ev.tier)
        keys = ev.block_hashes
        if ev.is_placeholder:
            # Offload tier copying blocks announced earlier: resolve each by alias.
            hs = []
            for k in keys:
                c = w.blocks.get(k)
                if c is None:
                    res.orphans += 1
                    res.reasons.append("placeholder block never announced")
                    return
                hs.append(c)
            res.stored += self._store(w, hs, t, keys)
            return
        if self.block_size is not None and ev.block_size != self.block_size:
            res.block_size_mismatch += 1
            return
        if ev.block_size <= 0 or len(ev.token_ids) != len(keys) * ev.block_size:
            res.malformed += 1
            return
        if ev.parent_block_hash is None:
            seed = ROOT_SEED
        else:
            seed = w.blocks.get(ev.parent_block_hash)
            if seed is None:
                res.orphans += 1
                res.reasons.append("parent block never announced")
                return
        extras = ev.extra_keys
        if extras is None and ev.lora_name is not None:
            extras = tuple([ev.lora_name] for _ in keys)
        tb = ev.token_bytes
        hs = chain_hashes(tokens_to_bytes(ev.token_ids) if tb is None else tb, ev.block_size, seed=seed, extras=extras)
        w.groups.add(ev.group_idx)
        if t == _GPU and w.blocks and not w.blocks.keys().isdisjoint(keys):
            res.copies_added += self._count_copies(w, keys, hs, t)
        res.stored += self._store(w, hs, t, keys)

    def _count_copies(self, w: _Worker, keys: Sequence[Any], hs: list, t: int) -> int:
        """Blocks announced again under the same engine hash while held: one more physical copy each."""
        n = 0
        for k, c in zip(keys, hs):
            if w.blocks.get(k) == c and self._tier_mask(c, t) & w.bit:
                w.copies[(k, t)] = w.copies.get((k, t), 0) + 1
                n += 1
        return n

    # ------------------------------------------------------------------- match
    def match(self, hashes: Sequence[int] | np.ndarray) -> dict[WorkerId, Overlap]:
        """Overlap of every worker holding at least the first block of ``hashes``."""
        hs = hashes.tolist() if isinstance(hashes, np.ndarray) else hashes
        if not hs:
            return {}
        any_get = self._any.get
        tiers = self._tiers
        mask = any_get(hs[0], 0)
        if not mask:
            return {}
        slots = self._slots
        depth: dict[int, int] = {}  # slot -> overlap
        offtier: list[tuple[int, list[int]]] = []
        if tiers:
            tm = tiers.get(hs[0])
            if tm is not None:
                offtier.append((0, tm))
        n = len(hs)
        i = 1
        while i < n:
            h = hs[i]
            m = mask & any_get(h, 0)
            if m != mask:
                gone = mask & ~m
                while gone:
                    low = gone & -gone
                    depth[low.bit_length() - 1] = i
                    gone ^= low
                mask = m
                if not mask:
                    break
            if tiers:
                tm = tiers.get(h)
                if tm is not None:
                    offtier.append((i, tm))
            i += 1
        while mask:
            low = mask & -mask
            depth[low.bit_length() - 1] = n
            mask ^= low
        out: dict[WorkerId, Overlap] = {}
        for slot, d in depth.items():
            host = disk = 0
            if offtier:
                b = 1 << slot
                for j, tm in offtier:
                    if j >= d:
                        break
                    if not tm[0] & b:
                        if tm[1] & b:
                            host += 1
                        elif tm[2] & b:
                            disk += 1
            out[slots[slot].id] = Overlap(d, d - host - disk, host, disk)  # type: ignore[union-attr]
        return out

    def match_tokens(
        self,
        token_ids: Any,
        block_size: int | None = None,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        mm_hashes: Iterable[Any] | None = None,
    ) -> dict[WorkerId, Overlap]:
        """Hash a prompt (see :func:`kvroute.block_hashes`) and :meth:`match` it."""
        bs = block_size if block_size is not None else self.block_size
        if bs is None:
            raise ValueError("match_tokens needs a block_size (none given and the index has none)")
        return self.match(block_hash_list(token_ids, bs, lora_name=lora_name, cache_salt=cache_salt, mm_hashes=mm_hashes))

    def holds(self, worker: WorkerId, content_hash: int, tier: Tier | str | None = None) -> bool:
        """Whether ``worker`` holds a block (on ``tier``, or on any tier)."""
        w = self._workers.get(worker)
        if w is None:
            return False
        if tier is None:
            return bool(self._any.get(content_hash, 0) & w.bit)
        return bool(self._tier_mask(content_hash, int(Tier.parse(tier))) & w.bit)

    def _tier_mask(self, c: int, t: int) -> int:
        tm = self._tiers.get(c)
        if tm is None:
            return self._any.get(c, 0) if t == _GPU else 0
        return tm[t]

    def blocks_of(self, worker: WorkerId) -> dict[ContentHash, frozenset[Tier]]:
        """Every block a worker holds, with its tiers (for tests, snapshots and tools)."""
        w = self._worker(worker)
        return {c: frozenset(t for t in _TIERS if self._tier_mask(c, int(t)) & w.bit) for c in w.blocks.values()}

    def holds_any(self, worker: WorkerId) -> bool:
        """Whether a known worker holds at least one block (O(1); False for an unknown worker)."""
        w = self._workers.get(worker)
        return w is not None and bool(w.blocks)

    # ------------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        """Entries, workers and an estimate of the bytes the index uses; O(workers), not O(entries)."""
        alias_ints = 0
        alias_bytes = 0
        for w in self._workers.values():
            alias_bytes += sys.getsizeof(w.blocks)
            if w.has_engine_keys:  # upper bound: every alias key an int of its own (an exact count
                alias_ints += len(w.blocks)  # walks every alias: ~50 ms at 1M entries, under the routing lock)
        n_blocks = len(self._any)
        est = (
            sys.getsizeof(self._any)
            + sys.getsizeof(self._tiers)
            + n_blocks * 36  # the content-hash int objects (keys shared with alias values)
            + n_blocks * 32  # the mask ints
            + len(self._tiers) * (88 + 3 * 32)
            + alias_bytes
            + alias_ints * 36
        )
        entries = sum(self._entries)
        return {
            "workers": len(self._workers),
            "blocks": n_blocks,
            "entries": entries,
            "entries_by_tier": {t.label: self._entries[int(t)] for t in _TIERS},
            "bytes_estimate": est,
            "bytes_per_entry": (est / entries) if entries else 0.0,
            "orphan_stores": self._orphan_stores,
            "capacity_drops": self._capacity_drops,
        }

    def __len__(self) -> int:
        """Number of (block, worker, tier) entries."""
        return sum(self._entries)

    # -------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """Raise AssertionError if any structural invariant (module docstring) is broken."""
        live = 0
        for slot, w in enumerate(self._slots):
            if w is not None:
                assert w.slot == slot and w.bit == 1 << slot, f"worker {w.id!r} slot mismatch"
                assert self._workers.get(w.id) is w, f"worker {w.id!r} not registered"
                live |= w.bit
        assert len(self._workers) == sum(1 for w in self._slots if w is not None)
        assert sorted(self._free_slots) == [i for i, w in enumerate(self._slots) if w is None]
        counts = [0, 0, 0]
        held: dict[int, int] = {}
        for c, m in self._any.items():
            assert m, f"empty mask kept for {c:#x}"
            assert m & ~live == 0, f"block {c:#x} held by a dead slot"
            tm = self._tiers.get(c)
            if tm is None:
                per = (m, 0, 0)
            else:
                assert tm[1] or tm[2], f"tier entry of {c:#x} has no off-GPU holder"
                assert tm[0] | tm[1] | tm[2] == m, f"any-mask of {c:#x} is not the OR of its tiers"
                per = tuple(tm)
            for t in range(3):
                counts[t] += bin(per[t]).count("1")
            mm = m
            while mm:
                low = mm & -mm
                held[low.bit_length() - 1] = held.get(low.bit_length() - 1, 0) + 1
                mm ^= low
        for c in self._tiers:
            assert c in self._any, f"tier entry {c:#x} without an any-mask"
        assert counts == self._entries, f"entry counters {self._entries} != {counts}"
        for w in self._workers.values():
            vals = list(w.blocks.values())
            assert len(vals) == len(set(vals)), f"worker {w.id!r} has two aliases for one block"
            assert len(vals) == held.get(w.slot, 0), f"worker {w.id!r}: {len(vals)} aliases, {held.get(w.slot, 0)} blocks"
            for c in vals:
                assert self._any.get(c, 0) & w.bit, f"worker {w.id!r} aliases a block it does not hold"
            for (k, t), n in w.copies.items():
                assert n >= 1, f"worker {w.id!r}: copy count {n} kept for {k!r}"
                c = w.blocks.get(k)
                assert c is not None and self._tier_mask(c, t) & w.bit, f"worker {w.id!r}: copies of a block it lacks"

    # ---------------------------------------------------------------- snapshot
    def _snapshot_body(self) -> dict[str, Any]:
        workers = []
        for w in self._workers.values():
            rows = []
            for k, c in w.blocks.items():
                bits = 0
                for t in range(3):
                    if self._tier_mask(c, t) & w.bit:
                        bits |= 1 << t
                rows.append((c, None if k is c or k == c else k, bits))
            copies = [(k, t, n) for (k, t), n in w.copies.items()]
            workers.append((w.id, rows, sorted(g for g in w.groups if g is not None), None in w.groups, copies))
        return {
            "hash_scheme": HASH_SCHEME_VERSION,
            "block_size": self.block_size,
            "max_blocks_per_worker": self.max_blocks_per_worker,
            "workers": workers,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a versioned, checksummed msgpack snapshot; atomic (temp file + rename)."""
        write_snapshot(path, self._snapshot_body())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "KVIndex":
        """Read a snapshot written by :meth:`save` (either backend's) into a new index.

        Raises :class:`SnapshotError` on a missing, truncated, corrupted or
        unknown-version file; no index is touched in that case.
        """
        return read_snapshot(path, cls._from_body)

    @classmethod
    def _from_body(cls, doc: Any) -> "KVIndex":
        if not isinstance(doc, dict) or doc.get("hash_scheme") != HASH_SCHEME_VERSION:
            raise SnapshotError("snapshot was written with another hash scheme")
        idx = cls(doc.get("block_size"), max_blocks_per_worker=doc.get("max_blocks_per_worker"))
        for wid, rows, groups, none_group, *rest in doc["workers"]:
            if isinstance(wid, list):
                wid = tuple(wid)
            w = idx._worker(wid, create=True)
            w.groups.update(groups)
            if none_group:
                w.groups.add(None)
            for c, k, bits in rows:
                if not isinstance(c, int) or not 0 <= c < 1 << 64 or not isinstance(bits, int) or not 0 < bits < 8:
                    raise SnapshotError(f"bad snapshot row {(c, k, bits)!r}")
                for t in range(3):
                    if bits >> t & 1:
                        idx._store(w, [c], t, None if k is None else [k])
            for k, t, n in rest[0] if rest else ():  # copy counts (absent in older snapshots)
                w.copies[(k, t)] = n
        idx.check_invariants()
        return idx


def write_snapshot(path: str | os.PathLike[str], body: dict[str, Any]) -> None:
    """The snapshot file format (both backends): magic, version, body length, xxh3 of the body, msgpack body."""
    data = msgpack.packb(body, use_bin_type=True)
    header = (
        SNAPSHOT_MAGIC
        + SNAPSHOT_VERSION.to_bytes(4, "big")
        + len(data).to_bytes(8, "big")
        + xxhash.xxh3_64_intdigest(data).to_bytes(8, "big")
    )
    atomic_write(path, (header, data), prefix=".kvindex-")


def read_snapshot(path: str | os.PathLike[str], from_body: Any) -> Any:
    """Check a snapshot file and build an index from its body with ``from_body`` (SnapshotError on any fault)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc}") from exc
    if len(data) < _HEADER_LEN or not data.startswith(SNAPSHOT_MAGIC):
        raise SnapshotError(f"{path} is not a kvroute index snapshot (bad header)")
    p = len(SNAPSHOT_MAGIC)
    version = int.from_bytes(data[p : p + 4], "big")
    length = int.from_bytes(data[p + 4 : p + 12], "big")
    checksum = int.from_bytes(data[p + 12 : p + 20], "big")
    if version != SNAPSHOT_VERSION:
        raise SnapshotError(f"{path}: snapshot version {version}, this kvroute reads {SNAPSHOT_VERSION}")
    body = data[_HEADER_LEN:]
    if len(body) != length:
        raise SnapshotError(f"{path}: truncated snapshot ({len(body)} of {length} body bytes)")
    if xxhash.xxh3_64_intdigest(body) != checksum:
        raise SnapshotError(f"{path}: snapshot checksum mismatch (corrupted file)")
    try:
        doc = msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=True)
        return from_body(doc)
    except SnapshotError:
        raise
    except Exception as exc:  # any structural surprise in a checksummed body is still a bad snapshot
        raise SnapshotError(f"{path}: malformed snapshot body: {exc!r}") from exc
