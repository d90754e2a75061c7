"""``NativeKVIndex``: the compiled index (kvroute.kvindex._kvcore) behind KVIndex's interface.

Same public methods, results, errors and snapshot format as the reference
:class:`kvroute.kvindex.index.KVIndex`; a Hypothesis stateful test drives both through
every operation and compares every result and snapshot (tests/test_native_core.py).

This wrapper keeps only what the C++ tables cannot hold:

* ``_slots`` / ``_ids`` / ``_free``: worker id <-> bit slot (lowest free slot reused, as the reference does);
* ``_groups``: per slot, the KV-cache groups seen in BlockStored events;
* ``_bytes_keys``: engine hashes given as bytes, by the 64-bit key the core files them under
  (xxh3-64 of the bytes with a fixed seed: like content hashes, exact up to 64-bit collisions).

Thread safety: every core call takes the core's mutex, so concurrent calls never corrupt the
tables, and stores or hashing over >= ``_kvcore.LARGE_BLOCKS`` blocks release the GIL.  A
sequence of calls (an ``apply`` of a batch) is atomic only under the caller's lock, as with
the reference (the Router and the sidecar's subscriber share one).
"""
from __future__ import annotations

import heapq
import itertools
import operator
import os
from typing import Any, Iterable, Sequence

from .errors import InvalidHashError, SnapshotError, UnknownWorkerError
from .events import INDEXED_SPEC_KINDS, AllBlocksCleared, ApplyResult, BlockRemoved, BlockStored, EventBatch
from .hashing import HASH_SCHEME_VERSION, ROOT_SEED, block_hash_list, encode_extras, native_prompt
from .index import Overlap, _engine_hash, read_snapshot, write_snapshot
from .types import ContentHash, Tier, WorkerId
from .backend import core as _core

_TIERS = (Tier.GPU, Tier.HOST, Tier.DISK)
_BYTES_SEED = 0x6B76726F75746562  # "kvrouteb"
_BYTE_TYPES = (bytes, bytearray, memoryview)
#: ApplyResult.reasons lines, by the core's code (0: parent unknown, 1: placeholder unknown).
_ORPHAN_REASONS = ("parent block never announced", "placeholder block never announced")


def _is_u64(h: Any) -> bool:
    """Whether ``h`` can name a block (an unsigned 64-bit int, numpy ints included)."""
    try:
        v = operator.index(h)
    except TypeError:
        return False
    return 0 <= v < 1 << 64


def encode_block_extras(extras: Sequence[Any] | None) -> list[bytes | None] | None:
    """Per-block extra keys as the msgpack bytes the hash chain mixes in (None: no extras)."""
    if not extras:
        return None
    return [encode_extras(ex) if ex else None for ex in extras]


class NativeKVIndex:
    """Which worker holds which block, on which tier -- compiled tables (see the module docstring)."""

    #: Which implementation this is.
    backend = "native"

    def __init__(self, block_size: int | None = None, *, max_blocks_per_worker: int | None = None) -> None:
        if _core is None:
            raise RuntimeError("the compiled core is not available")
        self.block_size = block_size
        self.max_blocks_per_worker = max_blocks_per_worker
        #: The C++ tables (kvroute.kvindex._kvcore.Index); only this class calls them.
        self._core = _core.Index()
        if max_blocks_per_worker is not None:
            self._core.set_limit(max_blocks_per_worker)
        self._slots: dict[WorkerId, int] = {}
        self._ids: list[Any] = []
        self._free: list[int] = []
        self._groups: dict[int, set] = {}
        self._bytes_keys: dict[int, bytes] = {}
        #: Bumped whenever a worker gets or loses a slot (the compiled route re-reads slots then).
        self.slot_generation = 0

    # ------------------------------------------------------------------ workers
    def add_worker(self, worker: WorkerId) -> None:
        self._slot(worker, create=True)

    def workers(self) -> list[WorkerId]:
        return list(self._slots)

    def __contains__(self, worker: object) -> bool:
        return worker in self._slots

    def _slot(self, worker: WorkerId, create: bool = False) -> int:
        s = self._slots.get(worker)
        if s is None:
            if not create:
                raise UnknownWorkerError(f"unknown worker {worker!r}")
            s = heapq.heappop(self._free) if self._free else len(self._ids)
            if s == len(self._ids):
                self._ids.append(worker)
            else:
                self._ids[s] = worker
            self._slots[worker] = s
            self._groups[s] = set()
            self._core.add_worker(s)
            self.slot_generation += 1
        return s

    def slots(self) -> dict[WorkerId, int]:
        """{worker id: bit slot} (for the compiled route)."""
        return dict(self._slots)

    def _drop_slot(self, worker: WorkerId, s: int) -> None:
        del self._slots[worker]
        self._ids[s] = None
        del self._groups[s]
        heapq.heappush(self._free, s)
        self.slot_generation += 1

    def remove_worker(self, worker: WorkerId) -> int:
        s = self._slot(worker)
        n = self._core.remove_worker(s)
        self._drop_slot(worker, s)
        return n

    def clear(self, worker: WorkerId) -> int:
        s = self._slot(worker)
        self._groups[s].clear()
        return self._core.clear(s)

    # -------------------------------------------------------------- engine keys
    def _bkey(self, k: Any, register: bool) -> int:
        b = bytes(k)
        key = _core.xxh3_64(b, _BYTES_SEED)
        if register:
            self._bytes_keys[key] = b
        return key

    def _keys(self, keys: Iterable[Any], register: bool) -> list[int]:
        return [self._bkey(k, register) if isinstance(k, _BYTE_TYPES) else k for k in keys]

    def _key_obj(self, k: int) -> Any:
        b = self._bytes_keys.get(k)
        return k if b is None else b

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
        """See :meth:`kvroute.kvindex.index.KVIndex.store`."""
        t = int(Tier.parse(tier))
        keys = None
        if engine_hashes is not None:
            keys = self._keys([_engine_hash(k) for k in engine_hashes], True)
        if not isinstance(hashes, (list, tuple)) and not hasattr(hashes, "dtype"):
            hashes = list(hashes)
        new = worker not in self._slots
        s = self._slot(worker, create=True)
        try:
            return self._core.store(s, hashes, keys, t, parent)
        except (InvalidHashError, ValueError, TypeError):
            if new:
                self._drop_slot(worker, s)
                self._core.remove_worker(s)
            raise

    def remove(
        self,
        worker: WorkerId,
        hashes: Iterable[int] | None = None,
        *,
        engine_hashes: Iterable[Any] | None = None,
        tier: Tier | str = "gpu",
    ) -> int:
        """See :meth:`kvroute.kvindex.index.KVIndex.remove`."""
        if (hashes is None) == (engine_hashes is None):
            raise ValueError("give exactly one of hashes or engine_hashes")
        t = int(Tier.parse(tier))
        s = self._slot(worker)
        if engine_hashes is not None:
            return self._core.remove_keys(s, self._keys([_engine_hash(k) for k in engine_hashes], False), t)
        if not isinstance(hashes, (list, tuple)) and not hasattr(hashes, "dtype"):
            hashes = list(hashes)
        try:
            return self._core.remove_hashes(s, hashes, t)
        except InvalidHashError:  # as the reference: what names no block is ignored
            return self._core.remove_hashes(s, [h for h in hashes if _is_u64(h)], t)

    def content_hash_of(self, worker: WorkerId, engine_hash: Any) -> ContentHash | None:
        s = self._slots.get(worker)
        if s is None:
            return None
        try:
            k = _engine_hash(engine_hash)
        except InvalidHashError:
            return None
        if isinstance(k, bytes):
            k = self._bkey(k, False)
        return self._core.content_hash_of(s, k)

    # ------------------------------------------------------------------ events
    def apply(self, worker: WorkerId, batch: EventBatch | Iterable[Any]) -> ApplyResult:
        """See :meth:`kvroute.kvindex.index.KVIndex.apply`."""
        res = ApplyResult()
        s = self._slot(worker, create=True)
        core = self._core
        frame = getattr(batch, "native_frame", None)
        if frame is not None:  # parsed by the core (kvroute.adapters.vllm.decode_packed): one call
            (res.stored, res.removed, res.cleared, res.orphans, res.unknown_removed, res.ignored, res.copies_added,
             res.copies_released, res.block_size_mismatch, res.malformed, why) = core.apply_frame(
                s, frame, -1 if self.block_size is None else self.block_size, self._groups[s])
            res.reasons.extend(_ORPHAN_REASONS[r] for r in why)
            return res
        events = batch.events if isinstance(batch, EventBatch) else batch
        for ev in events:
            if isinstance(ev, BlockStored):
                self._apply_stored(s, ev, res)
            elif isinstance(ev, BlockRemoved):
                if ev.group_idx is not None and ev.group_idx not in self._groups[s]:
                    res.ignored += 1
                    continue
                t = int(ev.tier)
                r = core.apply_removed(s, ev.block_hashes, t)
                if r is None:
                    r = core.apply_removed(s, self._keys(ev.block_hashes, False), t)
                res.removed += r[0]
                res.unknown_removed += r[1]
                res.copies_released += r[2]
            elif isinstance(ev, AllBlocksCleared):
                self._groups[s].clear()
                res.cleared += core.clear(s)
            else:
                raise TypeError(f"not a KV event: {type(ev).__name__}")
        return res

    def _apply_stored(self, s: int, ev: BlockStored, res: ApplyResult) -> None:
        if ev.spec_kind is not None and ev.spec_kind not in INDEXED_SPEC_KINDS:
            res.ignored += 1
            return
        t = int(ev.tier)
        keys = ev.block_hashes
        core = self._core
        if ev.is_placeholder:
            r = core.apply_placeholder(s, keys, t)
            if r is None:
                r = core.apply_placeholder(s, self._keys(keys, True), t)
            if r < 0:
                res.orphans += 1
                res.reasons.append(_ORPHAN_REASONS[1])
                return
            res.stored += r
            return
        if self.block_size is not None and ev.block_size != self.block_size:
            res.block_size_mismatch += 1
            return
        if ev.block_size <= 0 or len(ev.token_ids) != len(keys) * ev.block_size:
            res.malformed += 1
            return
        extras = ev.extra_keys
        if extras is None and ev.lora_name is not None:
            extras = [[ev.lora_name]] * len(keys)
        enc = encode_block_extras(extras)
        parent = ev.parent_block_hash
        r = core.apply_stored(s, keys, parent, ev.token_ids, ev.token_bytes, ev.block_size, t, enc)
        if r is None:  # bytes engine hashes: file them under their 64-bit keys
            if isinstance(parent, _BYTE_TYPES):
                parent = self._bkey(parent, False)
            r = core.apply_stored(s, self._keys(keys, True), parent, ev.token_ids, ev.token_bytes, ev.block_size, t, enc)
        stored, copies = r
        if stored < 0:
            res.orphans += 1
            res.reasons.append(_ORPHAN_REASONS[0])
            return
        self._groups[s].add(ev.group_idx)
        res.copies_added += copies
        res.stored += stored

    # ------------------------------------------------------------------- match
    def match(self, hashes: Sequence[int] | Any) -> dict[WorkerId, Overlap]:
        """See :meth:`kvroute.kvindex.index.KVIndex.match`."""
        try:
            return self._core.match_dict(hashes, self._ids, Overlap)  # type: ignore[no-any-return]
        except InvalidHashError:  # as the reference: no block is named by it, so the walk stops there
            return self._core.match_dict(list(itertools.takewhile(_is_u64, hashes)), self._ids, Overlap)  # type: ignore[no-any-return]

    def match_tokens(
        self,
        token_ids: Any,
        block_size: int | None = None,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        mm_hashes: Iterable[Any] | None = None,
    ) -> dict[WorkerId, Overlap]:
        """Hash a prompt and match it, in one walk (blocks past the match are not hashed)."""
        bs = block_size if block_size is not None else self.block_size
        if bs is None:
            raise ValueError("match_tokens needs a block_size (none given and the index has none)")
        toks, enc = native_prompt(token_ids, bs, lora_name, cache_salt, mm_hashes)
        out = self._core.match_tokens_dict(toks, bs, enc, ROOT_SEED, self._ids, Overlap)
        if out is None:  # a container the core does not read directly
            return self.match(block_hash_list(token_ids, bs, lora_name=lora_name, cache_salt=cache_salt, mm_hashes=mm_hashes))
        return out  # type: ignore[no-any-return]

    def holds(self, worker: WorkerId, content_hash: int, tier: Tier | str | None = None) -> bool:
        s = self._slots.get(worker)
        if s is None:
            return False
        if isinstance(content_hash, bool) or not isinstance(content_hash, int) or not 0 <= content_hash < 1 << 64:
            return False
        bits = self._core.tiers(s, content_hash)
        if tier is None:
            return bool(bits)
        return bool(bits >> int(Tier.parse(tier)) & 1)

    def holds_any(self, worker: WorkerId) -> bool:
        """Whether a known worker holds at least one block (False for an unknown worker); see KVIndex.holds_any."""
        s = self._slots.get(worker)
        if s is None:
            return False
        return self._core.alias_count(s) > 0 or len(self._core.rows(s)[0]) > 0

    def blocks_of(self, worker: WorkerId) -> dict[ContentHash, frozenset[Tier]]:
        cs, _, bits = self._core.rows(self._slot(worker))
        return {c: frozenset(t for t in _TIERS if b >> int(t) & 1) for c, b in zip(cs.tolist(), bits.tolist())}

    # ------------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        """As the reference's; ``bytes_estimate`` is the core's allocated bytes (exact, not estimated)."""
        g, h, d, blocks, orphans, drops, nbytes = self._core.counts()
        entries = g + h + d
        return {
            "workers": len(self._slots),
            "blocks": blocks,
            "entries": entries,
            "entries_by_tier": {"gpu": g, "host": h, "disk": d},
            "bytes_estimate": nbytes,
            "bytes_per_entry": (nbytes / entries) if entries else 0.0,
            "orphan_stores": orphans,
            "capacity_drops": drops,
        }

    def __len__(self) -> int:
        g, h, d = self._core.counts()[:3]
        return g + h + d

    def check_invariants(self) -> None:
        err = self._core.check()
        assert not err, err
        for w, s in self._slots.items():
            assert self._ids[s] == w, f"worker {w!r} slot mismatch"
        assert sorted(self._free) == sorted(set(range(len(self._ids))) - set(self._slots.values()))
        assert set(self._groups) == set(self._slots.values())

    # ---------------------------------------------------------------- snapshot
    def _snapshot_body(self) -> dict[str, Any]:
        workers = []
        for wid, s in self._slots.items():
            cs, ks, bits = self._core.rows(s)
            rows = []
            for c, k, b in zip(cs.tolist(), ks.tolist(), bits.tolist()):
                rows.append((c, None if k == c else self._key_obj(k), b))
            copies = [(self._key_obj(k), t, n) for k, t, n in self._core.copies(s)]
            groups = self._groups[s]
            workers.append((wid, rows, sorted(g for g in groups if g is not None), None in groups, copies))
        return {
            "hash_scheme": HASH_SCHEME_VERSION,
            "block_size": self.block_size,
            "max_blocks_per_worker": self.max_blocks_per_worker,
            "workers": workers,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a snapshot in the reference's format (either backend loads it); atomic."""
        write_snapshot(path, self._snapshot_body())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "NativeKVIndex":
        """Read a snapshot written by either backend (SnapshotError on any fault)."""
        return read_snapshot(path, cls._from_body)

    @classmethod
    def _from_body(cls, doc: Any) -> "NativeKVIndex":
        if not isinstance(doc, dict) or doc.get("hash_scheme") != HASH_SCHEME_VERSION:
            raise SnapshotError("snapshot was written with another hash scheme")
        idx = cls(doc.get("block_size"), max_blocks_per_worker=doc.get("max_blocks_per_worker"))
        for wid, rows, groups, none_group, *rest in doc["workers"]:
            if isinstance(wid, list):
                wid = tuple(wid)
            s = idx._slot(wid, create=True)
            idx._groups[s].update(groups)
            if none_group:
                idx._groups[s].add(None)
            per_tier: list[tuple[list[int], list[Any]]] = [([], []), ([], []), ([], [])]
            for c, k, bits in rows:
                if not isinstance(c, int) or not 0 <= c < 1 << 64 or not isinstance(bits, int) or not 0 < bits < 8:
                    raise SnapshotError(f"bad snapshot row {(c, k, bits)!r}")
                key = c if k is None else _engine_hash(k)
                for t in range(3):
                    if bits >> t & 1:
                        per_tier[t][0].append(c)
                        per_tier[t][1].append(key)
            for t, (cs, ks) in enumerate(per_tier):
                if cs:
                    idx._core.store(s, cs, idx._keys(ks, True), t, None)
            for k, t, n in rest[0] if rest else ():
                k = _engine_hash(k)
                idx._core.set_copies(s, idx._bkey(k, True) if isinstance(k, bytes) else k, t, n)
        idx.check_invariants()
        return idx
