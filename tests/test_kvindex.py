"""KVIndex unit tests: matching, tiers, aliases, snapshots, bounds, bad input."""
import os

import numpy as np
import pytest

from kvroute import KVIndex, KVRouteError, SnapshotError, Tier, UnknownWorkerError, block_hashes
from kvroute.kvindex import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch


def prompt(n_blocks, start=0, bs=4):
    return list(range(start, start + n_blocks * bs))


def test_match_longest_prefix_and_tiers():
    ix = KVIndex(4)
    h = block_hashes(prompt(6), 4)
    ix.store("a", h[:3])
    ix.store("a", h[3:5], parent=int(h[2]), tier="host")
    ix.store("b", h[:1], tier="disk")
    ix.store("b", h[:1], tier="host")
    ix.store("c", h[1:4])  # lacks block 0: never matches
    m = ix.match(h)
    assert set(m) == {"a", "b"}
    assert tuple(m["a"]) == (5, 3, 2, 0)
    assert tuple(m["b"]) == (1, 0, 1, 0)  # fastest tier counts
    ix.check_invariants()


def test_hole_in_a_chain_stops_the_match():
    ix = KVIndex(4)
    h = block_hashes(prompt(5), 4)
    ix.store("a", h)
    ix.remove("a", h[2:3])
    assert ix.match(h)["a"].total == 2
    ix.check_invariants()


def test_block_on_two_tiers_removed_from_one():
    ix = KVIndex(4)
    h = block_hashes(prompt(2), 4)
    ix.store("a", h, engine_hashes=[11, 12])
    ix.store("a", h, tier="host", engine_hashes=[11, 12])
    assert tuple(ix.match(h)["a"]) == (2, 2, 0, 0)
    assert ix.remove("a", engine_hashes=[11, 12]) == 2
    assert tuple(ix.match(h)["a"]) == (2, 0, 2, 0)
    assert ix.remove("a", engine_hashes=[11, 12], tier="cpu") == 2
    assert ix.match(h) == {}
    assert ix.stats()["entries"] == 0
    ix.check_invariants()


def test_orphan_store_is_counted_and_harmless():
    ix = KVIndex(4)
    h = block_hashes(prompt(3), 4)
    ix.store("a", h[1:], parent=int(h[0]))
    assert ix.stats()["orphan_stores"] == 1
    assert ix.match(h) == {}


def test_capacity_bound():
    ix = KVIndex(4, max_blocks_per_worker=3)
    h = block_hashes(prompt(5), 4)
    ix.store("a", h)
    assert ix.match(h)["a"].total == 3
    assert ix.stats()["capacity_drops"] == 2
    ix.check_invariants()


def test_unknown_worker_and_bad_args():
    ix = KVIndex()
    with pytest.raises(UnknownWorkerError):
        ix.remove("nope", [1])
    with pytest.raises(KVRouteError):
        ix.clear("nope")
    ix.add_worker("a")
    with pytest.raises(ValueError):
        ix.remove("a")
    with pytest.raises(ValueError):
        ix.store("a", [1, 2], engine_hashes=[1])
    with pytest.raises(ValueError):
        ix.store("a", [1], tier="tape")


def test_worker_slots_are_reused():
    ix = KVIndex()
    for w in range(10):
        ix.store(w, [100 + w])
    ix.remove_worker(3)
    ix.store("new", [5])
    assert ix.match([5]) == {"new": (1, 1, 0, 0)}
    assert ix.match([103]) == {}
    ix.check_invariants()


def test_apply_events_uses_content_hashes_from_tokens():
    ix = KVIndex(4)
    toks = prompt(3)
    ev = BlockStored(block_hashes=(901, 902, 903), parent_block_hash=None, token_ids=tuple(toks), block_size=4)
    r = ix.apply("a", EventBatch(1.0, (ev,)))
    assert r.stored == 3
    assert ix.match_tokens(toks + [1, 2, 3])["a"].total == 3
    # continuation chained on an engine-hash parent
    ev2 = BlockStored(block_hashes=(904,), parent_block_hash=903, token_ids=(7, 7, 7, 7), block_size=4)
    ix.apply("a", [ev2])
    assert ix.match_tokens(toks + [7, 7, 7, 7])["a"].total == 4
    # placeholder offload event resolved through aliases
    ix.apply("a", [BlockStored(block_hashes=(901, 902), parent_block_hash=None, token_ids=(), block_size=0, tier=Tier.HOST)])
    ix.apply("a", [BlockRemoved(block_hashes=(901, 902))])
    assert tuple(ix.match_tokens(toks)["a"]) == (3, 1, 2, 0)
    # orphan: unknown parent -> not applied, counted
    r = ix.apply("a", [BlockStored(block_hashes=(999,), parent_block_hash=12345, token_ids=(1, 1, 1, 1), block_size=4)])
    assert r.orphans == 1 and r.stored == 0
    # block size mismatch and malformed token counts are counted, not applied
    r = ix.apply("a", [BlockStored(block_hashes=(998,), parent_block_hash=None, token_ids=(1,) * 8, block_size=8)])
    assert r.block_size_mismatch == 1
    r = ix.apply("a", [BlockStored(block_hashes=(998,), parent_block_hash=None, token_ids=(1,) * 5, block_size=4)])
    assert r.malformed == 1
    # sliding-window group ignored, and its removals too
    r = ix.apply("a", [BlockStored(block_hashes=(901,), parent_block_hash=None, token_ids=tuple(toks[:4]), block_size=4,
                                   group_idx=1, spec_kind="sliding_window"),
                       BlockRemoved(block_hashes=(901,), group_idx=1)])
    assert r.ignored == 2
    r = ix.apply("a", [AllBlocksCleared()])
    assert r.cleared == 4 and ix.match_tokens(toks) == {}
    ix.check_invariants()


def test_apply_lora_namespace_matches_router_hashes():
    ix = KVIndex(4)
    toks = prompt(2)
    ix.apply("a", [BlockStored(block_hashes=(1, 2), parent_block_hash=None, token_ids=tuple(toks), block_size=4,
                               lora_name="sql-lora")])
    assert ix.match_tokens(toks) == {}
    assert ix.match_tokens(toks, lora_name="sql-lora")["a"].total == 2


def test_snapshot_roundtrip(tmp_path):
    ix = KVIndex(4)
    h = block_hashes(prompt(4), 4)
    ix.store("a", h, engine_hashes=[b"\x01" * 32, 2, 3, 4])
    ix.store(("node", 1), h[:2], tier="host")
    path = tmp_path / "snap"
    ix.save(path)
    back = KVIndex.load(path)
    assert back.match(h) == ix.match(h)
    assert back.block_size == 4
    assert back.remove("a", engine_hashes=[b"\x01" * 32]) == 1
    assert not list(tmp_path.glob(".kvindex-*"))  # no temp file left behind


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic", "version", "empty", "missing"])
def test_corrupt_snapshot_raises_typed_error(tmp_path, damage):
    ix = KVIndex(4)
    ix.store("a", block_hashes(prompt(8), 4))
    path = tmp_path / "snap"
    ix.save(path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 5]
    elif damage == "flip":
        data[-3] ^= 0xFF
    elif damage == "magic":
        data[0] ^= 0xFF
    elif damage == "version":
        data[11] = 99
    elif damage == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))
    if damage == "missing":
        os.unlink(path)
    with pytest.raises(SnapshotError):
        KVIndex.load(path)
    # the running index is untouched
    assert ix.match(block_hashes(prompt(8), 4))["a"].total == 8


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    ix = KVIndex(4)
    ix.store("a", [1, 2, 3])
    path = tmp_path / "snap"
    ix.save(path)
    before = path.read_bytes()
    import kvroute.kvindex.index as mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mod.os, "replace", boom)
    ix.store("a", [4])
    with pytest.raises(OSError):
        ix.save(path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".kvindex-*"))


def test_stats_reports_memory():
    ix = KVIndex(16)
    rng = np.random.default_rng(0)
    for w in range(8):
        ix.store(w, block_hashes(rng.integers(0, 30000, 16 * 50), 16))
    s = ix.stats()
    assert s["entries"] == 400 and s["workers"] == 8 and s["blocks"] == 400
    assert 0 < s["bytes_per_entry"] < 1000


def test_store_normalises_numpy_hashes_and_refuses_bad_ones(tmp_path):
    """Hashes from a list of numpy scalars become ints (as keys they would match, but no snapshot
    could hold them); non-u64 content hashes and non-int/bytes engine hashes are typed errors
    raised before anything changes; signed engine hashes name the same block in store and remove."""
    from kvroute.kvindex import InvalidHashError

    ix = KVIndex(16)
    hs = list(block_hashes(list(range(64)), 16))
    ix.store("a", hs, engine_hashes=[np.int64(-1), 2, b"x", np.uint64(4)])
    ix.save(tmp_path / "s.snap")
    back = KVIndex.load(tmp_path / "s.snap")
    assert back.blocks_of("a") == ix.blocks_of("a") and back.match(hs)["a"].total == 4
    assert ix.content_hash_of("a", -1) == int(hs[0]) and ix.content_hash_of("a", 1.5) is None
    before = ix.blocks_of("a")
    for bad in ([1.5], [-1], [1 << 64], ["a"], [None]):
        with pytest.raises(InvalidHashError):
            ix.store("a", bad)
    with pytest.raises(InvalidHashError):
        ix.store("a", [7], engine_hashes=[2.5])
    with pytest.raises(InvalidHashError):
        ix.store("a", [7], parent=-3)
    with pytest.raises(InvalidHashError):
        ix.remove("a", engine_hashes=[object()])
    with pytest.raises(InvalidHashError):
        ix.store("b", [1.5])  # refused before the worker is registered
    assert ix.blocks_of("a") == before and "b" not in ix
    assert ix.remove("a", engine_hashes=[(1 << 64) - 1]) == 1  # the unsigned form of -1
    ix.check_invariants()


def test_engine_copies_of_one_block_are_removed_one_by_one():
    """vLLM recomputes the last block of a fully cached prompt into a second block with the same
    hash: two BlockStored, later two BlockRemoved.  The block stays until its last copy goes."""
    ix = KVIndex(4)
    toks = tuple(prompt(2))
    stored = BlockStored(block_hashes=(51, 52), parent_block_hash=None, token_ids=toks, block_size=4)
    ix.apply("a", [stored])
    dup = BlockStored(block_hashes=(52,), parent_block_hash=51, token_ids=toks[4:], block_size=4)
    r = ix.apply("a", [dup])
    assert r.copies_added == 1 and r.stored == 0
    ix.check_invariants()
    r = ix.apply("a", [BlockRemoved(block_hashes=(52,))])
    assert r.copies_released == 1 and r.removed == 0
    assert ix.match_tokens(list(toks))["a"].total == 2
    ix.check_invariants()
    r = ix.apply("a", [BlockRemoved(block_hashes=(52,))])
    assert r.removed == 1
    assert ix.match_tokens(list(toks))["a"].total == 1
    ix.check_invariants()


def test_copy_counts_survive_snapshots_and_clear(tmp_path):
    ix = KVIndex(4)
    toks = tuple(prompt(1))
    ev = BlockStored(block_hashes=(61,), parent_block_hash=None, token_ids=toks, block_size=4)
    ix.apply("a", [ev, ev, ev])
    ix.save(tmp_path / "s")
    back = KVIndex.load(tmp_path / "s")
    for _ in range(2):
        assert back.apply("a", [BlockRemoved(block_hashes=(61,))]).copies_released == 1
    assert back.match_tokens(list(toks))["a"].total == 1
    back.apply("a", [BlockRemoved(block_hashes=(61,))])
    assert back.match_tokens(list(toks)) == {}
    ix.apply("a", [AllBlocksCleared()])
    ix.apply("a", [ev])
    assert ix.apply("a", [BlockRemoved(block_hashes=(61,))]).removed == 1  # clear forgot the copies
    ix.check_invariants()
