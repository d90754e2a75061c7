"""vLLM/SGLang KV-event decoding: golden bytes, field sets, strictness, fuzz, apply through the decoder."""
import dataclasses
import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvroute import KVIndex, KVRouteError, Tier
from kvroute.kvindex import block_hash_list
from kvroute.adapters.vllm import DecodeError, DecodeLimits, decode, encode
from kvroute.kvindex import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch

# Brief section 1: vLLM 0.33 encoder, ts=1700000000.5, one BlockStored of tokens 1..16, block_size 16, rank 0.
GOLDEN_033 = bytes.fromhex(
    "93cb41d954fc4020000091de000ba474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391cf137bb037547f4caf"
    "b1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f696473dc00100102030405060708090a0b0c0d0e0f10aa626c6f63"
    "6b5f73697a6510a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65c0aa65787472615f6b65797391c0a967"
    "726f75705f69647800b26b765f63616368655f737065635f6b696e64ae66756c6c5f617474656e74696f6e00"
)
GOLDEN_HASH = 0x137BB037547F4CAF
# vLLM 0.32 writes the same event with a fixmap header (0x8b) instead of map16 (0xde 0x000b).
GOLDEN_032 = GOLDEN_033.replace(bytes.fromhex("91de000b"), bytes.fromhex("918b"), 1)

GOLDEN_EVENT = BlockStored(
    block_hashes=(GOLDEN_HASH,), parent_block_hash=None, token_ids=tuple(range(1, 17)), block_size=16,
    tier=Tier.GPU, lora_name=None, extra_keys=None, group_idx=0, spec_kind="full_attention",
)


def pack(ts, events, rank=0):
    return msgpack.packb([ts, events] + ([] if rank is None else [rank]), use_bin_type=True)


def stored_map(hashes, tokens, bs=4, parent=None, **extra):
    d = {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
         "block_size": bs, "lora_id": None, "medium": "GPU", "lora_name": None}
    d.update(extra)
    return d


# ------------------------------------------------------------------ golden
def test_golden_033_decodes_to_the_expected_event():
    b = decode(GOLDEN_033)
    assert b == EventBatch(ts=1700000000.5, events=(GOLDEN_EVENT,), dp_rank=0)


def test_golden_032_fixmap_decodes_identically():
    assert GOLDEN_032 != GOLDEN_033 and GOLDEN_032[11] == 0x8B  # map header after array3, float64 (9 bytes), array1
    assert decode(GOLDEN_032) == decode(GOLDEN_033)


def test_encode_is_byte_exact_with_vllm_033_and_032():
    ev = dataclasses.replace(GOLDEN_EVENT, extra_keys=(None,))  # vLLM writes [nil] per block
    batch = EventBatch(1700000000.5, (ev,), 0)
    assert encode(batch) == GOLDEN_033
    assert encode(batch, map_header="fixmap") == GOLDEN_032
    with pytest.raises(ValueError):
        encode(batch, map_header="map32")


def test_golden_block_indexes_under_the_router_content_hash():
    ix = KVIndex(16)
    r = ix.apply("w", decode(GOLDEN_033))
    assert r.stored == 1 and r.orphans == 0
    assert ix.match_tokens(list(range(1, 17)))["w"].total == 1
    assert ix.content_hash_of("w", GOLDEN_HASH) == block_hash_list(list(range(1, 17)), 16)[0]


def test_vllm_own_encoder_when_installed():
    """Where vllm is importable (the interop venv), frames from its own classes and encoder decode."""
    kv = pytest.importorskip("vllm.distributed.kv_events")
    import msgspec

    def make(cls, **kw):  # fill whatever fields this vLLM version requires beyond ours
        fields = msgspec.structs.fields(cls)
        names = {f.name for f in fields}
        for f in fields:
            if f.required and f.name not in kw:
                kw[f.name] = None
        return cls(**{k: v for k, v in kw.items() if k in names})

    evs = [
        make(kv.BlockStored, block_hashes=[GOLDEN_HASH], parent_block_hash=None, token_ids=list(range(1, 17)),
             block_size=16, lora_id=None, medium="GPU", lora_name=None),
        make(kv.BlockRemoved, block_hashes=[GOLDEN_HASH], medium="GPU"),
        make(kv.AllBlocksCleared),
    ]
    payload = msgspec.msgpack.Encoder().encode(make(kv.KVEventBatch, ts=1700000000.5, events=evs, data_parallel_rank=0))
    b = decode(payload)
    assert b.ts == 1700000000.5 and b.dp_rank in (0, None)
    stored, removed, cleared = b.events
    assert stored.block_hashes == (GOLDEN_HASH,) and stored.token_ids == tuple(range(1, 17)) and stored.block_size == 16
    assert removed == BlockRemoved((GOLDEN_HASH,), Tier.GPU, removed.group_idx)
    assert cleared == AllBlocksCleared()


# ------------------------------------------------------------------ field sets
def test_hash_forms_int_signed_and_bytes():
    b = decode(pack(1.0, [stored_map([5, -1, b"\x01\x02"], list(range(12)), parent=-2)]))
    (ev,) = b.events
    assert ev.block_hashes == (5, (1 << 64) - 1, b"\x01\x02")
    assert ev.parent_block_hash == (1 << 64) - 2


def test_rank_absent_and_int_ts_and_unknown_fields_ignored():
    payload = pack(7, [stored_map([1], [0, 1, 2, 3], locality="x", ownership=3, session_id="s",
                                  lookahead_token_ids=[9], kv_cache_spec_sliding_window=None, brand_new={"a": 1})],
                   rank=None)
    b = decode(payload)
    assert b.ts == 7.0 and isinstance(b.ts, float) and b.dp_rank is None
    assert b.events[0].token_ids == (0, 1, 2, 3)


def test_media_map_to_tiers():
    evs = [stored_map([1], [], bs=0, medium=m) for m in ("GPU", "CPU", "STORAGE", None)]
    evs.append({"type": "BlockRemoved", "block_hashes": [1]})  # medium missing
    b = decode(pack(1.0, evs))
    assert [e.tier for e in b.events] == [Tier.GPU, Tier.HOST, Tier.DISK, Tier.GPU, Tier.GPU]


def test_placeholder_extra_keys_groups_removed_cleared():
    evs = [
        stored_map([1, 2], [], bs=0, medium="CPU"),
        stored_map([3, 4], list(range(8)), extra_keys=[["lora-a", "mm1"], None], lora_name="lora-a",
                   group_idx=1, kv_cache_spec_kind="sliding_window"),
        {"type": "BlockRemoved", "block_hashes": [3], "medium": "GPU", "group_idx": 2, "locality": 0},
        {"type": "AllBlocksCleared"},
    ]
    a, s, r, c = decode(pack(1.0, evs)).events
    assert a.is_placeholder and a.tier is Tier.HOST and a.parent_block_hash is None
    assert s.extra_keys == (("lora-a", "mm1"), None) and s.lora_name == "lora-a"
    assert s.group_idx == 1 and s.spec_kind == "sliding_window"
    assert r == BlockRemoved((3,), Tier.GPU, 2)
    assert c == AllBlocksCleared()


def test_tagged_array_events_of_older_vllm():
    evs = [["BlockStored", [11, 12], None, list(range(8)), 4, None, "GPU"],
           ["BlockRemoved", [11], "GPU"], ["AllBlocksCleared"]]
    s, r, c = decode(pack(2.0, evs)).events
    assert s.block_hashes == (11, 12) and s.token_ids == tuple(range(8)) and s.block_size == 4
    assert r.block_hashes == (11,) and c == AllBlocksCleared()


def test_all_nil_extra_keys_normalise_to_none():
    (ev,) = decode(pack(1.0, [stored_map([1, 2], list(range(8)), extra_keys=[None, None])])).events
    assert ev.extra_keys is None


# ------------------------------------------------------------------ strictness
BAD = {
    "msgpack": [b"", b"\xc1", GOLDEN_033[:-3], GOLDEN_033 + b"\x00", b"\x93\xcb"],
    "bad_batch": [msgpack.packb({"ts": 1}), pack("x", []), pack(1.0, 5), pack(1.0, [], rank=-1),
                  pack(float("nan"), []), pack(1.0, [], rank=True), msgpack.packb([1.0])],
    "unknown_event": [pack(1.0, [{"type": "BlockMoved"}]), pack(1.0, [{"type": 3}]), pack(1.0, [["Nope", 1]])],
    "bad_event": [pack(1.0, [7]), pack(1.0, [[]])],
    "bad_hashes": [pack(1.0, [stored_map(5, [])]), pack(1.0, [{"type": "BlockRemoved"}])],
    "bad_hash": [pack(1.0, [stored_map([1.5], [])]), pack(1.0, [stored_map([True], [])]),
                 pack(1.0, [stored_map([1 << 64 - 1, "s"], [])]), pack(1.0, [stored_map([1], [], parent="p")]),
                 pack(1.0, [stored_map([[1]], [])])],
    "bad_tokens": [pack(1.0, [stored_map([1], [1, 2, -3, 4])]), pack(1.0, [stored_map([1], [1, 2, 3, 1 << 32])]),
                   pack(1.0, [stored_map([1], "abcd")]), pack(1.0, [stored_map([1], [1.0, 2, 3, 4])])],
    "bad_token_count": [pack(1.0, [stored_map([1], [1, 2, 3])]), pack(1.0, [stored_map([1], [1, 2, 3, 4], bs=0)])],
    "bad_field": [pack(1.0, [stored_map([1], [1, 2, 3, 4], bs="4")]), pack(1.0, [stored_map([1], [], bs=-1)]),
                  pack(1.0, [stored_map([1], [], group_idx="g")]), pack(1.0, [stored_map([1], [], lora_name=3)]),
                  pack(1.0, [stored_map([1], [], kv_cache_spec_kind=[1])])],
    "bad_medium": [pack(1.0, [stored_map([1], [], medium="TPU")]), pack(1.0, [stored_map([1], [], medium=1)])],
    "bad_extra_keys": [pack(1.0, [stored_map([1], [1, 2, 3, 4], extra_keys=["a"])]),
                       pack(1.0, [stored_map([1], [1, 2, 3, 4], extra_keys=[["a"], ["b"]])]),
                       pack(1.0, [stored_map([1], [1, 2, 3, 4], extra_keys=5)])],
}


@pytest.mark.parametrize("reason,payload", [(r, p) for r, ps in BAD.items() for p in ps])
def test_malformed_payloads_raise_decode_error_with_reason(reason, payload):
    with pytest.raises(DecodeError) as ei:
        decode(payload)
    assert ei.value.reason == reason, str(ei.value)
    assert isinstance(ei.value, KVRouteError)


def test_not_bytes():
    with pytest.raises(DecodeError) as ei:
        decode("text")  # type: ignore[arg-type]
    assert ei.value.reason == "not_bytes"


def test_limits_are_enforced():
    lim = DecodeLimits(max_payload_bytes=10_000, max_events=2, max_hashes_per_event=3, max_tokens_per_event=8)
    ok = pack(1.0, [stored_map([1, 2], list(range(8)))])
    assert decode(ok, limits=lim).events
    roomy = dataclasses.replace(lim, max_events=16)  # msgpack's cap is the largest limit
    cases = [
        ("too_large", b"\x00" * 10_001, lim),
        ("too_many_events", pack(1.0, [{"type": "AllBlocksCleared"}] * 3), lim),
        ("too_many_hashes", pack(1.0, [{"type": "BlockRemoved", "block_hashes": [1, 2, 3, 4]}]), lim),
        ("too_many_tokens", pack(1.0, [stored_map([1, 2, 3], list(range(12)))]), roomy),
        ("array_limit", pack(1.0, [stored_map([1, 2, 3], list(range(12)))]), lim),  # refused inside msgpack
        ("array_limit", pack(1.0, [stored_map([1], [], lora_name="x" * 70_000)]), DecodeLimits()),
    ]
    for reason, p, limits in cases:
        with pytest.raises(DecodeError) as ei:
            decode(p, limits=limits)
        assert ei.value.reason == reason


def test_a_huge_declared_array_is_refused_before_allocation():
    # array32 header claiming 2**31 elements, then nothing: must fail fast, not allocate 16 GiB
    with pytest.raises(DecodeError) as ei:
        decode(b"\x92\xcb" + b"\x00" * 8 + b"\xdd\x7f\xff\xff\xff")
    assert ei.value.reason == "array_limit"  # the cap is the payload length: 15 elements at most


# ------------------------------------------------------------------ round trip
hash_st = st.one_of(st.integers(0, (1 << 64) - 1), st.binary(min_size=1, max_size=32))
tier_st = st.sampled_from(list(Tier))


@st.composite
def event_st(draw):
    kind = draw(st.sampled_from(["stored", "placeholder", "removed", "cleared"]))
    if kind == "cleared":
        return AllBlocksCleared()
    n = draw(st.integers(0, 4))
    hashes = tuple(draw(st.lists(hash_st, min_size=n, max_size=n)))
    if kind == "removed":
        return BlockRemoved(hashes, draw(tier_st), draw(st.none() | st.integers(0, 3)))
    if kind == "placeholder":
        return BlockStored(hashes, None, (), 0, draw(tier_st))
    bs = draw(st.integers(1, 4))
    toks = tuple(draw(st.lists(st.integers(0, (1 << 32) - 1), min_size=n * bs, max_size=n * bs)))
    extras = draw(st.none() | st.just(tuple((("x", i),) if i % 2 else None for i in range(n))))
    if extras is not None and (n == 0 or all(e is None for e in extras)):
        extras = None
    return BlockStored(hashes, draw(st.none() | hash_st), toks, bs, draw(tier_st),
                       draw(st.none() | st.text(max_size=5)), extras if toks else None,
                       draw(st.none() | st.integers(0, 3)), draw(st.none() | st.sampled_from(["full_attention", "sliding_window"])))


@settings(max_examples=150, deadline=None)
@given(st.lists(event_st(), max_size=5), st.floats(0, 2e9), st.none() | st.integers(0, 7), st.sampled_from(["map16", "fixmap"]))
def test_encode_decode_round_trip(events, ts, rank, header):
    batch = EventBatch(ts, tuple(events), rank)
    assert decode(encode(batch, map_header=header)) == batch


# ------------------------------------------------------------------ fuzz
def _corpus():
    rnd = random.Random(3)
    toks = [rnd.randrange(50_000) for _ in range(64)]
    evs = [
        BlockStored((1, 2, 3, 4), None, tuple(toks), 16),
        BlockStored((5,), 4, tuple(toks[:16]), 16, extra_keys=(("salt",),)),
        BlockStored((1, 2), None, (), 0, Tier.HOST),
        BlockRemoved((3, 4)),
        AllBlocksCleared(),
    ]
    return [GOLDEN_033, GOLDEN_032, encode(EventBatch(5.0, tuple(evs), 1))]


CORPUS = _corpus()


def _seeded_index():
    ix = KVIndex(16)
    ix.apply("w", decode(CORPUS[2]))
    ix.apply("w", decode(GOLDEN_033))
    return ix


def _state(ix):
    return {w: ix.blocks_of(w) for w in ix.workers()}, ix.stats()["entries"]


def _mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for kind, pos, val in ops:
        if not b:
            b = bytearray([val])
            continue
        p = pos % len(b)
        if kind == 0:
            b[p] = val
        elif kind == 1:
            del b[p:p + 1 + val % 8]
        elif kind == 2:
            b[p:p] = bytes([val]) * (1 + val % 5)
        else:
            b = b[:p]
    return bytes(b)


def _check_fuzzed(payload):
    ix = _seeded_index()
    before = _state(ix)
    try:
        batch = decode(payload)
    except DecodeError as exc:
        assert exc.reason and isinstance(exc.reason, str)
        assert _state(ix) == before  # a refused payload touches nothing
        return
    # a payload that decodes is a valid batch: applying it may change the index,
    # but never raises and never breaks the index's invariants
    ix.apply("w", batch)
    ix.check_invariants()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(CORPUS))),
       st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_mutated_payloads_only_raise_decode_error(which, ops):
    _check_fuzzed(_mutate(CORPUS[which], ops))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_only_raise_decode_error(data):
    _check_fuzzed(data)


msgpack_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(["type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "medium",
                               "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(field_names, msgpack_value | st.sampled_from(
    ["BlockStored", "BlockRemoved", "AllBlocksCleared", "GPU", "CPU"]), max_size=8), max_size=3),
    msgpack_value)
def test_fuzz_structured_garbage_only_raises_decode_error(events, ts):
    _check_fuzzed(msgpack.packb([ts, events, 0], use_bin_type=True))


# ------------------------------------------------------------------ apply through the decoder
def _frames_for(tokens, bs, hashes, parent=None, medium="GPU"):
    return pack(1.0, [stored_map(hashes, tokens, bs=bs, parent=parent, medium=medium)])


def test_apply_through_decoder_chains_on_engine_parents_and_tiers():
    bs = 4
    toks = list(range(100, 100 + 5 * bs))
    ix = KVIndex(bs)
    ix.apply("w", decode(_frames_for(toks[:3 * bs], bs, [-5, -6, -7])))
    ix.apply("w", decode(_frames_for(toks[3 * bs:], bs, [b"h4", b"h5"], parent=-7)))
    ix.apply("w", decode(pack(2.0, [stored_map([-5 & ((1 << 64) - 1), -6], [], bs=0, medium="CPU")])))
    m = ix.match_tokens(toks)["w"]
    assert tuple(m) == (5, 5, 0, 0)
    ix.apply("w", decode(pack(3.0, [{"type": "BlockRemoved", "block_hashes": [-5, -6, b"h5"], "medium": "GPU"}])))
    assert tuple(ix.match_tokens(toks)["w"]) == (4, 2, 2, 0)
    ix.check_invariants()


def test_orphan_through_decoder_is_counted_not_chained():
    ix = KVIndex(4)
    r = ix.apply("w", decode(_frames_for([1, 2, 3, 4], 4, [2], parent=1)))
    assert r.orphans == 1 and r.stored == 0 and ix.stats()["entries"] == 0
    r = ix.apply("w", decode(pack(1.0, [stored_map([9], [], bs=0, medium="CPU")])))
    assert r.orphans == 1 and ix.stats()["entries"] == 0


def test_sliding_window_group_is_ignored_full_attention_indexed():
    ix = KVIndex(4)
    toks = [1, 2, 3, 4]
    ev_full = stored_map([7], toks, group_idx=0, kv_cache_spec_kind="full_attention")
    ev_swa = stored_map([7], toks, group_idx=1, kv_cache_spec_kind="sliding_window")
    r = ix.apply("w", decode(pack(1.0, [ev_full, ev_swa])))
    assert r.stored == 1 and r.ignored == 1
    # the sliding-window group evicting its copy must not remove the full-attention block
    r = ix.apply("w", decode(pack(2.0, [{"type": "BlockRemoved", "block_hashes": [7], "medium": "GPU", "group_idx": 1}])))
    assert r.ignored == 1 and ix.match_tokens(toks)["w"].total == 1
    r = ix.apply("w", decode(pack(3.0, [{"type": "BlockRemoved", "block_hashes": [7], "medium": "GPU", "group_idx": 0}])))
    assert r.removed == 1 and ix.match_tokens(toks) == {}


def test_engine_hash_reused_for_other_content_replaces_the_old_block():
    # engine names are opaque; if one is reused for different tokens the old block must go,
    # not linger without an alias (which would break the index's invariants)
    ix = KVIndex(4)
    ix.apply("w", decode(_frames_for([1, 2, 3, 4], 4, [42])))
    ix.apply("w", decode(_frames_for([5, 6, 7, 8], 4, [42])))
    ix.check_invariants()
    assert ix.match_tokens([1, 2, 3, 4]) == {}
    assert ix.match_tokens([5, 6, 7, 8])["w"].total == 1
    ix.apply("w", decode(pack(1.0, [{"type": "BlockRemoved", "block_hashes": [42]}])))
    assert ix.stats()["entries"] == 0
    ix.check_invariants()


def test_lora_and_salt_namespaces_match_router_hashes():
    bs = 4
    toks = list(range(8))
    ix = KVIndex(bs)
    ix.apply("w", decode(pack(1.0, [stored_map([1, 2], toks, lora_name="ad", extra_keys=[["ad", "salt"], ["ad"]])])))
    assert ix.match_tokens(toks, lora_name="ad", cache_salt="salt")["w"].total == 2
    assert ix.match_tokens(toks) == {}
