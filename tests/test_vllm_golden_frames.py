"""kvroute's vLLM decoder against frames written by vLLM 0.32's own encoder.

``tests/data/vllm_0_32_frames.msgpack`` was produced by
``tests/interop/gen_vllm_frames.py`` inside the real-vLLM venv (vLLM's
``KVEventBatch`` objects, real sha256 block hashes, ``msgspec`` encoder as in
``ZmqEventPublisher``); it stores each case's frames and the events vLLM put in
them, in kvroute's terms.  These tests need no vllm: they check that
:func:`kvroute.adapters.vllm.decode` reads every case exactly, that kvroute's
encoder reproduces vLLM 0.32's bytes where the events keep every field, that
decoded events index under the same content hashes a router computes from the
prompt, and that any truncation is a :class:`DecodeError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest

from kvroute.adapters.vllm import DecodeError, decode, encode
from kvroute.kvindex import KVIndex
from kvroute.kvindex.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from kvroute.kvindex.types import Tier

DATA = Path(__file__).parent / "data" / "vllm_0_32_frames.msgpack"
DOC = msgpack.unpackb(DATA.read_bytes(), raw=False, strict_map_key=False)
CASES = {c["name"]: c for c in DOC["cases"]}

#: The brief's byte-exact sample, written by vLLM 0.33 (map16 event header).
BRIEF_SAMPLE_0_33 = bytes.fromhex(
    "93cb41d954fc4020000091de000ba474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391cf137bb0"
    "37547f4cafb1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f696473dc00100102030405060708090a0b0c"
    "0d0e0f10aa626c6f636b5f73697a6510a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65c0aa65"
    "787472615f6b65797391c0a967726f75705f69647800b26b765f63616368655f737065635f6b696e64ae66756c6c5f6174"
    "74656e74696f6e00"
)


def _tuples(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return tuple(_tuples(y) for y in x)
    return x


def _extras(x: Any) -> Any:
    """extra_keys up to representation: all-nil entries mean no extras."""
    if x is None or all(e is None for e in x):
        return None
    return _tuples(x)


def _as_expected(ev: Any) -> dict[str, Any]:
    if isinstance(ev, BlockStored):
        return {
            "type": "BlockStored",
            "block_hashes": list(ev.block_hashes),
            "parent_block_hash": ev.parent_block_hash,
            "token_ids": list(ev.token_ids),
            "block_size": ev.block_size,
            "tier": Tier.parse(ev.tier).label,
            "lora_name": ev.lora_name,
            "extra_keys": _extras(ev.extra_keys),
            "group_idx": ev.group_idx,
            "spec_kind": ev.spec_kind,
        }
    if isinstance(ev, BlockRemoved):
        return {"type": "BlockRemoved", "block_hashes": list(ev.block_hashes),
                "tier": Tier.parse(ev.tier).label, "group_idx": ev.group_idx}
    assert isinstance(ev, AllBlocksCleared)
    return {"type": "AllBlocksCleared"}


def _golden_event(e: dict[str, Any]) -> dict[str, Any]:
    e = dict(e)
    if "extra_keys" in e:
        e["extra_keys"] = _extras(e["extra_keys"])
    return e


def test_data_file_comes_from_vllm_0_32() -> None:
    assert DOC["format"] == 1
    assert DOC["source"].startswith("vllm 0.32.0")
    assert len(CASES) >= 10


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_matches_vllm(name: str) -> None:
    case = CASES[name]
    topic, seq, payload = case["frames"]
    assert topic == b"" and len(seq) == 8
    batch = decode(payload)
    assert isinstance(batch, EventBatch)
    exp = case["expected"]
    assert batch.ts == exp["ts"]
    assert batch.dp_rank == exp["dp_rank"]
    assert [_as_expected(e) for e in batch.events] == [_golden_event(e) for e in exp["events"]]
    for ev in batch.events:  # hashes arrive normalised: unsigned 64-bit ints or bytes
        for h in getattr(ev, "block_hashes", ()):
            assert isinstance(h, bytes) or 0 <= h < 1 << 64


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c["reencode_exact"]))
def test_encode_reproduces_vllm_0_32_bytes(name: str) -> None:
    payload = CASES[name]["frames"][2]
    assert encode(decode(payload), map_header="fixmap") == payload


def test_brief_sample_0_33_and_0_32_decode_alike() -> None:
    ours = CASES["brief_sample_0_32"]["frames"][2]
    # same bytes but the event map header: 0.32 fixmap (0x8b) vs 0.33 map16 (0xde000b)
    assert ours.replace(b"\x91\x8b", b"\x91\xde\x00\x0b", 1) == BRIEF_SAMPLE_0_33
    assert decode(BRIEF_SAMPLE_0_33) == decode(ours)


@pytest.mark.parametrize("name", ["int_hashes_store_chain_remove", "bytes_hashes"])
def test_decoded_events_index_under_prompt_content_hashes(name: str) -> None:
    """Blocks stored from vLLM's events match the router's own hashes of the same tokens."""
    exp = CASES[name]["expected"]["events"]
    root, child = exp[0], exp[1]
    bs = root["block_size"]
    idx = KVIndex(block_size=bs)
    res = idx.apply("w", decode(CASES[name]["frames"][2]))
    assert res.orphans == 0 and res.malformed == 0 and res.unknown_removed == 0
    prompt = root["token_ids"] + child["token_ids"]
    n_removed = len(exp[2]["block_hashes"])
    n_child = len(child["block_hashes"])
    assert idx.match_tokens(prompt, bs)["w"].total == len(root["block_hashes"]) + n_child - n_removed


def test_placeholders_resolve_to_gpu_blocks() -> None:
    idx = KVIndex(block_size=16)
    res = idx.apply("w", decode(CASES["cpu_offload_placeholders"]["frames"][2]))
    assert res.orphans == 0
    toks = CASES["cpu_offload_placeholders"]["expected"]["events"][0]["token_ids"]
    toks = toks + CASES["cpu_offload_placeholders"]["expected"]["events"][1]["token_ids"]
    ov = idx.match_tokens(toks, 16)["w"]
    assert (ov.total, ov.gpu, ov.host) == (3, 3, 0)  # the CPU copy of block 1 was removed again
    assert idx.holds("w", idx.content_hash_of("w", CASES["cpu_offload_placeholders"]["expected"]["events"][0]["block_hashes"][0]), "host")


def test_lora_extra_keys_separate_namespaces() -> None:
    case = CASES["extra_keys_lora_mm_salt"]
    ev = case["expected"]["events"][0]
    idx = KVIndex(block_size=16)
    idx.apply("w", decode(case["frames"][2]))
    # without the adapter/salt/image the same tokens are another prompt
    assert idx.match_tokens(ev["token_ids"], 16) == {}


@pytest.mark.parametrize("name", ["int_hashes_store_chain_remove", "extra_keys_lora_mm_salt", "rank_3_block_32_big_tokens"])
def test_every_truncation_is_a_decode_error(name: str) -> None:
    payload = CASES[name]["frames"][2]
    for cut in range(len(payload)):
        with pytest.raises(DecodeError):
            decode(payload[:cut])


# ------------------------------------------------------- frames from a running engine
ENGINE = msgpack.unpackb((Path(__file__).parent / "data" / "vllm_0_32_engine_frames.msgpack").read_bytes(),
                         raw=False, strict_map_key=False)


def test_engine_frames_predict_every_reported_hit() -> None:
    """Frames a real vLLM 0.32 engine published (tests/interop/capture_engine_frames.py):
    applied in order, the index predicts each request's num_cached_tokens exactly,
    through evictions (8-block cache) and a prefix-cache reset."""
    bs = ENGINE["block_size"]
    frames = ENGINE["frames"]
    assert [int.from_bytes(f[1], "big") for f in frames] == list(range(len(frames)))
    idx = KVIndex(block_size=bs)
    applied = 0
    checked = removed = cleared = 0
    for req in ENGINE["requests"]:
        if "prompt" in req:
            prompt = req["prompt"]
            ov = idx.match_tokens(prompt, bs).get("engine")
            blocks = ov.total if ov is not None else 0
            assert min(blocks, (len(prompt) - 1) // bs) * bs == req["num_cached_tokens"], (checked, req)
            checked += 1
        while applied <= req["last_seq"]:  # the batches this request (or reset) caused
            res = idx.apply("engine", decode(frames[applied][2]))
            assert res.orphans == 0 and res.malformed == 0 and res.block_size_mismatch == 0
            removed += res.removed
            cleared += res.cleared
            applied += 1
        idx.check_invariants()
    assert checked >= 10 and removed > 0 and cleared > 0
    assert sum(r.get("num_cached_tokens", 0) > 0 for r in ENGINE["requests"]) >= 4


def test_engine_frames_have_vllm_0_32_shape() -> None:
    raw = msgpack.unpackb(ENGINE["frames"][0][2], raw=False)
    assert isinstance(raw, list) and len(raw) == 3 and raw[2] == 0  # [ts, events, rank]
    ev = raw[1][0]
    assert list(ev)[:11] == ["type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                             "medium", "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind"]
    assert ev["medium"] == "GPU" and ev["kv_cache_spec_kind"] == "full_attention" and ev["group_idx"] == 0
    assert all(isinstance(h, int) and 0 <= h < 1 << 64 for h in ev["block_hashes"])
