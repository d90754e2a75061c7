"""The compiled vLLM frame path (``decode_packed`` + ``NativeKVIndex.apply``) against the reference.

The reference is ``kvroute.adapters.vllm.decode`` (msgpack -> dataclasses) applied by either
index.  For every payload -- real vLLM 0.32 frames, random well-formed batches in both map
layouts, and fuzzed (mutated, truncated, random) bytes -- ``decode_packed`` must give the same
events, ts and rank, or raise the same ``DecodeError`` reason, and applying its result must
leave the index exactly as applying the reference's batch does (results, snapshots, stats).
"""
from __future__ import annotations

import random
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvroute.adapters.vllm import DecodeError, DecodeLimits, PackedBatch, decode, decode_packed, encode
from kvroute.kvindex import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, Tier
from kvroute.kvindex.backend import core
from kvroute.kvindex.index import KVIndex as PyIndex

needs_core = pytest.mark.skipif(core is None, reason="compiled core not built")

if core is not None:
    from kvroute.kvindex.native import NativeKVIndex
else:  # the reference-backend pass runs only the tests that do not need the core
    NativeKVIndex = None  # type: ignore[assignment,misc]

DATA = Path(__file__).parent / "data"


def _real_frames() -> list[bytes]:
    out = []
    eng = msgpack.unpackb((DATA / "vllm_0_32_engine_frames.msgpack").read_bytes(), raw=False, strict_map_key=False)
    out += [f[2] for f in eng["frames"]]
    gold = msgpack.unpackb((DATA / "vllm_0_32_frames.msgpack").read_bytes(), raw=False, strict_map_key=False)
    out += [c["frames"][2] for c in gold["cases"]]
    return out


def _outcome(fn, payload, limits=None):
    try:
        return "ok", fn(payload, limits=limits)
    except DecodeError as exc:
        return "err", exc.reason


def check_same(payloads: list[bytes], block_size: int | None, limits: DecodeLimits | None = None) -> int:
    """Decode + apply each payload both ways on fresh indexes; return how many took the compiled path."""
    fast_ix, ref_ix, py_ix = NativeKVIndex(block_size), NativeKVIndex(block_size), PyIndex(block_size)
    n_fast = 0
    for p in payloads:
        a, b = _outcome(decode_packed, p, limits), _outcome(decode, p, limits)
        assert a[0] == b[0], (a, b, p)
        if a[0] == "err":
            assert a[1] == b[1]
            continue
        got, ref = a[1], b[1]
        if isinstance(got, PackedBatch):
            n_fast += 1
            assert got.to_batch() == ref
            assert got.n_events == len(ref.events) and got.has_clear == ref.has_clear
            for g, r in zip(got.events, ref.events):
                if isinstance(r, BlockStored):
                    assert g.token_bytes == r.token_bytes
        else:
            assert got == ref
        ra, rb, rc = fast_ix.apply("w", got), ref_ix.apply("w", ref), py_ix.apply("w", got)
        assert ra == rb == rc
        fast_ix.check_invariants()
    assert fast_ix._snapshot_body() == ref_ix._snapshot_body()
    assert fast_ix._groups == ref_ix._groups
    assert fast_ix.stats() == ref_ix.stats()
    assert {w: py_ix.blocks_of(w) for w in py_ix.workers()} == {w: fast_ix.blocks_of(w) for w in fast_ix.workers()}
    return n_fast


@needs_core
def test_real_vllm_frames_take_the_compiled_path_and_match() -> None:
    frames = _real_frames()
    eng = msgpack.unpackb((DATA / "vllm_0_32_engine_frames.msgpack").read_bytes(), raw=False, strict_map_key=False)
    n = check_same([f[2] for f in eng["frames"]], eng["block_size"])
    assert n == len(eng["frames"])  # every real engine frame is read by the core
    for p in frames:  # golden cases one by one (they mix block sizes), any block size
        check_same([p], None)


# ------------------------------------------------------------------ random batches
_H = st.integers(0, (1 << 64) - 1)


@st.composite
def batches(draw, fast_only: bool = False):
    bs = draw(st.sampled_from([1, 2, 4]))
    known: list[int] = []
    events = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["stored", "stored", "stored", "placeholder", "removed", "cleared"]))
        tier = draw(st.sampled_from([Tier.GPU, Tier.GPU, Tier.HOST, Tier.DISK]))
        group = draw(st.sampled_from([None, None, 0, 1]))
        if kind == "stored":
            n = draw(st.integers(0, 5))
            hs = tuple(draw(st.lists(st.sampled_from(known) if known and draw(st.booleans()) else _H, min_size=n, max_size=n)))
            toks = tuple(draw(st.lists(st.integers(0, (1 << 32) - 1) | st.integers(0, 300), min_size=n * bs, max_size=n * bs)))
            parent = draw(st.sampled_from([None] + known[-3:] + [12345]))
            spec = draw(st.sampled_from([None, "full_attention", "mla_attention", "sliding_window"]))
            lora = None if fast_only else draw(st.sampled_from([None, None, None, "ad"]))
            extras = None
            if not fast_only and toks and draw(st.integers(0, 4)) == 0:
                extras = tuple(draw(st.sampled_from([None, ("mm", 7)])) for _ in hs)
            events.append(BlockStored(hs, parent, toks, bs if toks else draw(st.sampled_from([0, bs])), tier,
                                      lora_name=lora, extra_keys=extras, group_idx=group, spec_kind=spec))
            known += list(hs)
        elif kind == "placeholder":
            hs = tuple(draw(st.lists(st.sampled_from(known) if known else _H, max_size=4)))
            events.append(BlockStored(hs, None, (), 0, tier, group_idx=group))
        elif kind == "removed":
            hs = tuple(draw(st.lists(st.sampled_from(known) if known else _H, max_size=4)))
            events.append(BlockRemoved(hs, tier, group))
        else:
            events.append(AllBlocksCleared())
    rank = draw(st.sampled_from([None, 0, 3]))
    ts = draw(st.sampled_from([1_700_000_000.25, 0.0, 5.0]))
    return bs, EventBatch(ts, tuple(events), rank)


@needs_core
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(batches(), min_size=1, max_size=6), st.sampled_from(["map16", "fixmap"]))
def test_random_batches_same_events_and_same_index(seq, layout) -> None:
    bs = seq[0][0]
    check_same([encode(b, map_header=layout) for _, b in seq], bs)


@needs_core
@settings(max_examples=60, deadline=None)
@given(st.lists(batches(fast_only=True), min_size=1, max_size=4))
def test_plain_batches_all_take_the_compiled_path(seq) -> None:
    payloads = [encode(b) for _, b in seq]
    assert check_same(payloads, None) == len(payloads)


@needs_core
def test_what_the_core_hands_to_the_reference() -> None:
    """Payloads outside the core's subset still decode (by the reference), never half-applied."""
    base = {"type": "BlockStored", "block_hashes": [5], "parent_block_hash": None, "token_ids": [1, 2],
            "block_size": 2, "medium": "GPU"}
    cases = [
        dict(base, lora_name="ad"),
        dict(base, extra_keys=[["mm", 1]]),
        dict(base, block_hashes=[b"\x01\x02"]),
        dict(base, block_hashes=[-5]),
        dict(base, medium="gpu"),
        dict(base, kv_cache_spec_kind="fu\u00e9ll"),
    ]
    for ev in cases:
        p = msgpack.packb([1.0, [ev], None])
        got = decode_packed(p)
        assert isinstance(got, EventBatch) and got == decode(p)
        check_same([p], 2)
    tagged = msgpack.packb([1.0, [["BlockStored", [5], None, [1, 2], 2, None, "GPU"]], 0])
    assert isinstance(decode_packed(tagged), EventBatch)
    check_same([tagged], 2)
    assert isinstance(decode_packed(msgpack.packb([1.0, [base], 0])), PackedBatch)
    # repeated keys: msgpack keeps the last one; the core leaves it to the reference
    pk = msgpack.Packer()
    items = list(base.items()) + [("medium", "CPU")]
    dup = pk.pack_array_header(3) + pk.pack(1.0) + pk.pack_array_header(1) + pk.pack_map_header(len(items))
    dup += b"".join(pk.pack(k) + pk.pack(v) for k, v in items) + pk.pack(0)
    got = decode_packed(dup)
    assert isinstance(got, EventBatch) and got.events[0].tier == Tier.HOST
    check_same([dup], 2)


@needs_core
@pytest.mark.parametrize("field,limit", [("max_events", 1), ("max_hashes_per_event", 1), ("max_tokens_per_event", 3),
                                         ("max_payload_bytes", 30), ("max_map_len", 3), ("max_str_bytes", 4)])
@needs_core
def test_limits_give_the_reference_errors(field, limit) -> None:
    b = EventBatch(1.0, (BlockStored((1, 2), None, (1, 2, 3, 4), 2), BlockRemoved((1,))), 0)
    p = encode(b)
    lim = DecodeLimits(**{field: limit})
    a, r = _outcome(decode_packed, p, lim), _outcome(decode, p, lim)
    assert a[0] == r[0] == "err" and a[1] == r[1]


# ------------------------------------------------------------------------ fuzzing
def _mutants(payload: bytes, rng: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        b = bytearray(payload)
        op = rng.randrange(6)
        if op == 0 and b:  # flip bits
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncate
            b = b[: rng.randrange(len(b) + 1)]
        elif op == 2:  # insert a msgpack type byte
            b.insert(rng.randrange(len(b) + 1), rng.choice([0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc7, 0xca, 0xcb, 0xcf, 0xd3,
                                                              0xd9, 0xdc, 0xdd, 0xde, 0xdf, 0x91, 0x81, 0xa3, 0xff]))
        elif op == 3 and b:  # replace a byte by any value
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 4:  # append junk
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        else:  # splice a length header: huge lengths must not allocate or over-read
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdc\xff\xff", b"\xdf\x7f\xff\xff\xff", b"\xdb\xff\xff\xff\xff"])
        out.append(bytes(b))
    return out


def _rng_batch(rng: random.Random) -> EventBatch:
    """A random well-formed batch of every event kind (seeds for the fuzzer)."""
    evs: list = []
    for _ in range(rng.randint(1, 4)):
        n = rng.randint(0, 3)
        hs = tuple(rng.choice([rng.randrange(1 << 64), rng.randrange(5)]) for _ in range(n))
        tier = rng.choice(list(Tier))
        group = rng.choice([None, 0, 1])
        kind = rng.randrange(5)
        if kind <= 1:
            evs.append(BlockStored(hs, rng.choice([None, 1, 2]), tuple(rng.randrange(70_000) for _ in range(2 * n)), 2,
                                   tier, group_idx=group, spec_kind=rng.choice([None, "full_attention", "sliding_window"])))
        elif kind == 2:
            evs.append(BlockStored(hs, None, (), 0, tier, group_idx=group))
        elif kind == 3:
            evs.append(BlockRemoved(hs, tier, group))
        else:
            evs.append(AllBlocksCleared())
    return EventBatch(rng.random() * 1e9, tuple(evs), rng.choice([None, 0, 2]))


@needs_core
def test_fuzzed_frames_same_outcome_never_a_crash() -> None:
    rng = random.Random(14)
    seeds = _real_frames()
    for _ in range(25):
        seeds.append(encode(_rng_batch(rng), map_header=rng.choice(["map16", "fixmap"])))
    fuzzed = []
    for p in seeds:
        fuzzed += _mutants(p, rng, 40)
    fuzzed += [bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    n_err = 0
    for p in fuzzed:
        a, r = _outcome(decode_packed, p), _outcome(decode, p)
        assert a[0] == r[0], (p, a, r)
        if a[0] == "err":
            n_err += 1
            assert a[1] == r[1], (p, a, r)
            continue
        got = a[1].to_batch() if isinstance(a[1], PackedBatch) else a[1]
        assert got == r[1], p
    assert n_err > 500  # the fuzzer does produce bad frames
    # and a stream of fuzzed frames leaves both indexes equal (mutants that still decode included)
    check_same(fuzzed[:2000], None)


@needs_core
def test_non_bytes_payloads_are_the_references_errors() -> None:
    for p in ("text", 5, None, [1]):
        a, r = _outcome(decode_packed, p), _outcome(decode, p)
        assert a == r and a[0] == "err"
    p = encode(EventBatch(1.0, (BlockRemoved((1,)),), 0))
    assert decode_packed(bytearray(p)) == decode(p)  # not bytes: the reference reads it


# --------------------------------------------------- a bug the fuzzer found (both backends)
@pytest.mark.parametrize("cls", [pytest.param("native", marks=needs_core), "python"])
def test_renaming_a_block_with_copies_keeps_invariants(cls) -> None:
    """A held GPU block announced again (one more copy), then under a new engine hash: the alias
    moves to the new name and the old name's copy count must go with the old name (found by
    test_fuzzed_frames_same_outcome_never_a_crash: 'copies of a block it lacks')."""
    ix = NativeKVIndex(2) if cls == "native" else PyIndex(2)
    ix.apply("w", EventBatch(1.0, (BlockStored((10, 11), None, (1, 2, 3, 4), 2),)))
    r = ix.apply("w", EventBatch(2.0, (BlockStored((11,), 10, (3, 4), 2),)))
    assert r.copies_added == 1
    ix.apply("w", EventBatch(3.0, (BlockStored((12,), 10, (3, 4), 2),)))  # same content, new name
    ix.check_invariants()
    r = ix.apply("w", EventBatch(4.0, (BlockRemoved((12,)),)))
    assert r.removed == 1 and r.copies_released == 0
    assert ix.content_hash_of("w", 11) is None
    ix.check_invariants()
