"""The compiled core against the pure-Python reference: XXH3-64, chained hashes, the index, snapshots.

Every test here compares the two backends operation by operation; they skip when the compiled
core is not in use (KVROUTE_PURE_PYTHON=1, or not built), since there is nothing to compare.
"""
from __future__ import annotations

import itertools
import os
import random

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvroute.kvindex import hashing
from kvroute.kvindex.backend import BACKEND, core
from kvroute.kvindex.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from kvroute.kvindex.errors import InvalidTokensError, KVRouteError
from kvroute.kvindex.index import KVIndex as PyKVIndex
from kvroute.kvindex.types import Tier

pytestmark = pytest.mark.skipif(BACKEND != "native", reason="compiled core not in use (nothing to compare)")

if BACKEND == "native":
    from kvroute.kvindex.native import NativeKVIndex
else:  # pragma: no cover
    NativeKVIndex = None  # type: ignore


def test_xxh3_bit_exact_every_length_0_to_2048_random_seeds():
    rng = random.Random(14)
    data = rng.randbytes(2048)
    for n in range(2049):
        for seed in (0, rng.getrandbits(64), rng.getrandbits(32), (1 << 64) - 1):
            assert core.xxh3_64(data[:n], seed) == xxhash.xxh3_64_intdigest(data[:n], seed), (n, seed)
    for n in range(0, 2049, 7):  # other bytes at each length too
        d = rng.randbytes(n)
        seed = rng.getrandbits(64)
        assert core.xxh3_64(d, seed) == xxhash.xxh3_64_intdigest(d, seed)


def _reference(fn, *args, **kw):
    """Run a hashing function with the compiled core switched off (the reference path)."""
    fn = {hashing.block_hash_list: hashing.py_block_hash_list, hashing.chain_hashes: hashing.py_chain_hashes}.get(fn, fn)
    saved = hashing._core
    hashing._core = None
    try:
        return fn(*args, **kw)
    finally:
        hashing._core = saved


@pytest.mark.parametrize("bs", [1, 3, 16, 64])
def test_chained_hashes_equal_reference(bs):
    rng = np.random.default_rng(bs)
    for n in (0, 1, bs - 1, bs, 5 * bs + 1, 300):
        toks = rng.integers(0, 2**32, n, dtype=np.uint64)
        lst = [int(x) for x in toks]
        ref = _reference(hashing.block_hash_list, lst, bs)
        assert hashing.block_hash_list(lst, bs) == ref
        assert hashing.block_hash_list(tuple(lst), bs) == ref
        for dt in (np.uint32, np.int64, np.uint64):
            assert hashing.block_hash_list(toks.astype(dt), bs) == ref
        assert hashing.block_hash_list(toks.astype(">u4"), bs) == ref  # big-endian: converted first
        assert hashing.block_hash_list(toks.astype(np.uint32)[::-1][::-1], bs) == ref
        assert hashing.block_hashes(lst, bs).tolist() == ref
        kw = dict(lora_name="adapter-a", cache_salt="s", mm_hashes=[("img", 2, bs + 1), "whole"])
        assert hashing.block_hash_list(lst, bs, **kw) == _reference(hashing.block_hash_list, lst, bs, **kw)
        assert hashing.block_hashes(toks, bs, lora_name="x").tolist() == _reference(hashing.block_hash_list, lst, bs, lora_name="x")
        data = toks.astype("<u4").tobytes()
        extras = [["a", 1], None, [], [b"z", ("t", 2)]]
        assert hashing.chain_hashes(data, bs, seed=99, extras=extras) == _reference(hashing.chain_hashes, data, bs, seed=99, extras=extras)


def test_chained_hashes_torch_tensor():
    torch = pytest.importorskip("torch")
    t = torch.arange(100, dtype=torch.int64)
    assert hashing.block_hash_list(t, 16) == _reference(hashing.block_hash_list, list(range(100)), 16)


@pytest.mark.parametrize("bad", [[1, -1], [1, 2**32], [1.5], ["a"], np.array([-1, 2]), np.array([0.5]), np.zeros((2, 2), dtype=np.uint32)])
def test_bad_tokens_raise_typed_error_in_both(bad):
    with pytest.raises(InvalidTokensError):
        hashing.block_hash_list(bad, 1)
    with pytest.raises(InvalidTokensError):
        _reference(hashing.block_hash_list, bad, 1)


# ----------------------------------------------------------------- stateful index
WORKERS = ["w0", "w1", "w2", 7, ("t", 1)]
TIERS = [Tier.GPU, Tier.HOST, Tier.DISK]
BS = 2
PROMPTS = [list(p) for n in range(1, 5) for p in itertools.product(range(2), repeat=n * BS)][::3]


def ekey(worker, c: int):
    """Engine hashes: ints for w1, bytes for 7, signed-looking big ints for the tuple id, none for the rest."""
    if worker == "w1":
        return (c ^ 0x5A5A5A5A) & ((1 << 64) - 1)
    if worker == 7:
        return c.to_bytes(8, "little")
    if worker == ("t", 1):
        return (c * 3) & ((1 << 64) - 1)
    return None


def normalized(body: dict) -> dict:
    out = {}
    for wid, rows, groups, none_group, *rest in body["workers"]:
        out[wid if not isinstance(wid, list) else tuple(wid)] = (
            sorted(rows, key=lambda r: (r[0], repr(r[1]))), groups, none_group, sorted(rest[0] if rest else [], key=repr))
    return {"meta": (body["hash_scheme"], body["block_size"], body["max_blocks_per_worker"]), "workers": out}


class BothBackends(RuleBasedStateMachine):
    """Drives the reference and the compiled index through the same operations; compares everything."""

    @initialize(limit=st.sampled_from([None, None, 6]))
    def setup(self, limit):
        self.py = PyKVIndex(BS, max_blocks_per_worker=limit)
        self.nat = NativeKVIndex(BS, max_blocks_per_worker=limit)
        self.tmp = 0

    def both(self, name, *args, **kw):
        """Call a method on both; results (or the exception types) must be equal."""
        outs = []
        for idx in (self.py, self.nat):
            try:
                outs.append(("ok", getattr(idx, name)(*args, **kw)))
            except KVRouteError as exc:
                outs.append(("err", type(exc)))
            except (ValueError, TypeError, KeyError) as exc:
                outs.append(("err", type(exc).__mro__[0]))
        assert outs[0] == outs[1], (name, args, kw, outs)
        return outs[0][1]

    @rule(worker=st.sampled_from(WORKERS), p=st.sampled_from(PROMPTS), start=st.integers(0, 3),
          tier=st.sampled_from(TIERS), with_keys=st.booleans(), orphan=st.booleans())
    def store(self, worker, p, start, tier, with_keys, orphan):
        hs = hashing.block_hash_list(p, BS)
        start = min(start, len(hs) - 1)
        chain = hs[start:]
        parent = hs[start - 1] if start else (12345 if orphan else None)
        keys = [ekey(worker, c) for c in chain] if with_keys and ekey(worker, 0) is not None else None
        self.both("store", worker, chain, parent=parent, tier=tier, engine_hashes=keys)

    @rule(worker=st.sampled_from(WORKERS), p=st.sampled_from(PROMPTS), tier=st.sampled_from(TIERS),
          by_engine=st.booleans(), extra=st.booleans())
    def remove(self, worker, p, tier, by_engine, extra):
        hs = hashing.block_hash_list(p, BS)
        if extra:
            hs = hs + [777]
        if by_engine and ekey(worker, 0) is not None:
            self.both("remove", worker, engine_hashes=[ekey(worker, c) for c in hs], tier=tier)
        else:
            self.both("remove", worker, hs, tier=tier)

    @rule(worker=st.sampled_from(WORKERS), p=st.sampled_from(PROMPTS), start=st.integers(0, 3),
          tier=st.sampled_from(TIERS), lora=st.sampled_from([None, "L"]), group=st.sampled_from([None, 0, 1]),
          spec=st.sampled_from([None, "full_attention", "sliding_window"]), bad_parent=st.booleans(),
          placeholder=st.booleans(), bs=st.sampled_from([BS, BS, 3]))
    def apply_stored(self, worker, p, start, tier, lora, group, spec, bad_parent, placeholder, bs):
        kf = ekey(worker, 0) is not None
        nblk = len(p) // BS
        start = min(start, nblk - 1)
        extras = None if lora is None else tuple([lora] for _ in range(nblk))
        hs = hashing.block_hash_list(p, BS, lora_name=lora)
        key = (lambda c: ekey(worker, c)) if kf else (lambda c: c)
        keys = tuple(key(c) for c in hs[start:])
        parent = key(hs[start - 1]) if start else None
        if bad_parent:
            parent = 424242
        toks = () if placeholder else tuple(p[start * BS:])
        ev = BlockStored(keys, parent, toks, 0 if placeholder else bs, tier, lora_name=lora,
                         extra_keys=None if extras is None else extras[start:], group_idx=group, spec_kind=spec)
        self.both("apply", worker, EventBatch(0.0, (ev,)))

    @rule(worker=st.sampled_from(WORKERS), p=st.sampled_from(PROMPTS), tier=st.sampled_from(TIERS),
          group=st.sampled_from([None, 0, 1]), clear=st.booleans())
    def apply_removed(self, worker, p, tier, group, clear):
        kf = ekey(worker, 0) is not None
        hs = hashing.block_hash_list(p, BS)
        keys = tuple(ekey(worker, c) if kf else c for c in hs)
        evs = [BlockRemoved(keys, tier, group)]
        if clear:
            evs.append(AllBlocksCleared())
        self.both("apply", worker, evs)

    @rule(worker=st.sampled_from(WORKERS))
    def clear(self, worker):
        self.both("clear", worker)

    @rule(worker=st.sampled_from(WORKERS))
    def remove_worker(self, worker):
        self.both("remove_worker", worker)

    @rule(p=st.sampled_from(PROMPTS), lora=st.sampled_from([None, "L"]), bad=st.sampled_from([None, -1, 1 << 64, "x"]))
    def match(self, p, lora, bad):
        hs = hashing.block_hash_list(p, BS, lora_name=lora)
        if bad is not None:  # a value that names no block: the walk stops there; a removal ignores it
            self.both("match", hs[:1] + [bad] + hs[1:])
            self.both("remove", "w0", [bad] + hs[:1], tier="host")
        self.both("match", hs)
        self.both("match", np.array(hs, dtype=np.uint64))
        self.both("match_tokens", p, lora_name=lora)

    @rule(worker=st.sampled_from(WORKERS), p=st.sampled_from(PROMPTS), tier=st.sampled_from(TIERS + [None]))
    def queries(self, worker, p, tier):
        for c in hashing.block_hash_list(p, BS):
            self.both("holds", worker, c, tier)
            k = ekey(worker, c)
            self.both("content_hash_of", worker, c if k is None else k)
        self.both("blocks_of", worker)

    @rule()
    def snapshot_roundtrip(self, tmp_path_factory=None):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            a, b = os.path.join(d, "py.snap"), os.path.join(d, "nat.snap")
            self.py.save(a)
            self.nat.save(b)
            # each backend reads the other's file
            nat2 = NativeKVIndex.load(a)
            py2 = PyKVIndex.load(b)
            assert normalized(nat2._snapshot_body()) == normalized(self.py._snapshot_body())
            assert normalized(py2._snapshot_body()) == normalized(self.nat._snapshot_body())

    @invariant()
    def same_state(self):
        if not hasattr(self, "py"):
            return
        self.py.check_invariants()
        self.nat.check_invariants()
        assert normalized(self.py._snapshot_body()) == normalized(self.nat._snapshot_body())
        assert len(self.py) == len(self.nat)
        sp, sn = self.py.stats(), self.nat.stats()
        for k in ("workers", "blocks", "entries", "entries_by_tier", "orphan_stores", "capacity_drops"):
            assert sp[k] == sn[k], k
        assert sorted(map(repr, self.py.workers())) == sorted(map(repr, self.nat.workers()))


TestBothBackends = BothBackends.TestCase
TestBothBackends.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


def test_many_workers_and_growth():
    """1,024 workers (16-word bitsets), enough blocks to rehash the tables several times."""
    py, nat = PyKVIndex(4), NativeKVIndex(4)
    rng = random.Random(3)
    prompts = [[rng.randrange(1000) for _ in range(64)] for _ in range(40)]
    for w in range(1024):
        p = prompts[w % 40][: 4 * rng.randrange(1, 17)]
        hs = hashing.block_hash_list(p, 4)
        for idx in (py, nat):
            idx.store(w, hs, tier=Tier.GPU if w % 3 else Tier.HOST)
    for w in range(0, 1024, 5):
        for idx in (py, nat):
            idx.remove(w, hashing.block_hash_list(prompts[w % 40][:8], 4), tier="gpu")
    for p in prompts:
        hs = hashing.block_hash_list(p, 4)
        assert py.match(hs) == nat.match(hs)
    nat.check_invariants()
    assert normalized(py._snapshot_body()) == normalized(nat._snapshot_body())
    for w in range(0, 1024, 2):
        assert py.remove_worker(w) == nat.remove_worker(w)
    nat.check_invariants()
    for p in prompts:
        hs = hashing.block_hash_list(p, 4)
        assert py.match(hs) == nat.match(hs)


def test_bucket_tables_churn_shrink_and_regrow():
    """The bucketed tables through growth, mass removal (overflow counts unwound, tables rebuilt
    smaller), regrowth and engine names reused for other content: every result, match and
    snapshot equals the reference's, and check() (which recounts every bucket's overflow count
    and re-finds every key) passes after each phase."""
    py, nat = PyKVIndex(4), NativeKVIndex(4)
    rng = random.Random(14)
    shared = [rng.getrandbits(64) for _ in range(300)]
    stored: dict[int, list[tuple[int, int]]] = {w: [] for w in range(6)}

    def store(w: int, hs: list[int], ks: list[int], tier: str = "gpu") -> None:
        assert py.store(w, hs, engine_hashes=ks, tier=tier) == nat.store(w, hs, engine_hashes=ks, tier=tier)
        stored[w].extend(zip(hs, ks))

    def same() -> None:
        nat.check_invariants()
        assert normalized(py._snapshot_body()) == normalized(nat._snapshot_body())
        for w in range(6):
            for h, _ in stored[w][:: max(1, len(stored[w]) // 40)]:
                assert py.match([h]) == nat.match([h])
        assert py.stats()["entries"] == nat.stats()["entries"]

    for w in range(6):  # growth from empty: ~4,000 blocks a worker, a shared prefix
        hs = shared[: rng.randrange(50, 300)] + [rng.getrandbits(64) for _ in range(4000)]
        store(w, hs, [rng.getrandbits(64) for _ in hs], tier="gpu" if w % 2 else "host")
    same()
    for w in range(6):  # remove ~95%: by engine hash for even workers, by content hash for odd ones
        rng.shuffle(stored[w])
        cut = len(stored[w]) * 19 // 20
        gone, stored[w] = stored[w][:cut], stored[w][cut:]
        tier = "gpu" if w % 2 else "host"
        if w % 2:
            assert py.remove(w, [h for h, _ in gone], tier=tier) == nat.remove(w, [h for h, _ in gone], tier=tier)
        else:
            assert py.remove(w, engine_hashes=[k for _, k in gone], tier=tier) == nat.remove(
                w, engine_hashes=[k for _, k in gone], tier=tier)
    same()
    for w in range(6):  # regrow; half the new blocks reuse a surviving engine name for new content
        old = [k for _, k in stored[w]]
        hs = [rng.getrandbits(64) for _ in range(3000)]
        ks = [old[i % len(old)] if i % 2 and i < 2 * len(old) else rng.getrandbits(64) for i in range(len(hs))]
        stored[w] = [(h, k) for h, k in stored[w] if k not in set(ks)]
        store(w, hs, ks, tier="gpu" if w % 2 else "host")
    same()
    for w in (0, 3):
        assert py.clear(w) == nat.clear(w)
        stored[w] = []
    same()
    assert py.remove_worker(5) == nat.remove_worker(5)
    stored[5] = []
    same()


def test_match_tokens_fused_walk_equals_hash_then_match():
    """The compiled match_tokens stops hashing where the match ends; results and errors are unchanged."""
    py, nat = PyKVIndex(4), NativeKVIndex(4)
    rng = random.Random(9)
    prompts = [[rng.randrange(100) for _ in range(4 * rng.randrange(1, 30))] for _ in range(20)]
    for w, p in enumerate(prompts):
        k = rng.randrange(1, len(p) // 4 + 1)
        for idx in (py, nat):
            idx.store(w % 5, hashing.block_hash_list(p, 4)[:k])
    for p in prompts + [[1, 2, 3, 4, 5]]:
        for q in (p, p + [7, 7], np.array(p, dtype=np.int32), p[:3]):
            assert nat.match_tokens(q) == py.match_tokens(q) == nat.match(hashing.block_hash_list(q, 4))
            assert nat.match_tokens(q, lora_name="L") == py.match_tokens(q, lora_name="L")
        with pytest.raises(InvalidTokensError):  # a bad token far past the match still raises
            nat.match_tokens(p + [1, 2, 3, -1])


def test_holds_any_agrees_with_the_reference() -> None:
    from kvroute.kvindex.index import KVIndex as PyKVIndex
    from kvroute.kvindex.native import NativeKVIndex

    for idx in (PyKVIndex(4), NativeKVIndex(4)):
        idx.add_worker("a")
        idx.add_worker("b")
        assert not idx.holds_any("a") and not idx.holds_any("zz")
        idx.store("a", [11, 12])
        assert idx.holds_any("a") and not idx.holds_any("b")
        idx.remove("a", [11, 12])
        assert not idx.holds_any("a")
