"""vLLM / SGLang KV-event wire format: strict decoder and a matching encoder.

Map of this module:

* :class:`DecodeLimits` -- caps on payload bytes and array lengths, so a
  hostile frame cannot make the decoder allocate without bound.
* :class:`DecodeError`  -- the only exception :func:`decode` raises; its
  ``reason`` is a short, stable, machine-readable string (a metrics label).
* :func:`decode`        -- one msgpack payload (the third frame of a PUB
  message) -> :class:`kvroute.kvindex.events.EventBatch`.
* :func:`decode_packed` / :class:`PackedBatch` -- the same decoding by the compiled core
  (``kvroute.kvindex._kvcore.parse_frame``), which reads the payload straight into index
  operations; payloads it is not sure of go through :func:`decode`, so results and errors are
  the reference's (tests/test_vllm_native_frames.py compares them on real and fuzzed frames).
* :func:`encode`        -- the inverse, writing vLLM 0.33's layout (map16
  event maps) or 0.32's (fixmap); used by tests, fake publishers and benches.

The format (``docs/events.md`` has the full table): a batch is the msgpack
array ``[ts, events, data_parallel_rank?]``; each event is a map with a
``"type"`` key (vLLM >= 0.10, SGLang) or, in older vLLM releases, a tagged
array ``["BlockStored", field0, field1, ...]`` with fields in declaration
order.  Fields this module does not know are ignored, so newer engines that
append fields still decode.  Hashes may be unsigned ints, signed ints (other
engines) or bytes; they are normalised with
:func:`kvroute.kvindex.types.normalize_engine_hash`.

Normalisations (documented contract of the decoded events):

* ``medium`` missing or nil -> ``Tier.GPU``; ``"CPU"`` -> ``Tier.HOST``;
  ``"STORAGE"`` -> ``Tier.DISK`` (via :meth:`Tier.parse`).
* ``extra_keys`` whose entries are all nil -> ``None`` (vLLM writes
  ``[nil] * n`` for a plain prompt); otherwise each entry becomes a tuple.
* ``kv_cache_spec_kind`` -> ``BlockStored.spec_kind``; ``lora_id`` (deprecated)
  and fields such as ``locality``/``ownership``/``session_id`` are ignored.
* msgpack booleans are Python ints: inside ``token_ids`` they read as 0/1;
  as a hash, a block size or a rank they are rejected.
"""
from __future__ import annotations

import array
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import msgpack

from kvroute.kvindex.backend import core as _core
from kvroute.kvindex.errors import KVRouteError
from kvroute.kvindex.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, KVEvent
from kvroute.kvindex.types import U64_MASK, Tier, normalize_engine_hash

__all__ = ["DecodeError", "DecodeLimits", "DEFAULT_LIMITS", "PackedBatch", "decode", "decode_packed", "encode", "MEDIUM_OF_TIER"]


class DecodeError(KVRouteError, ValueError):
    """A KV-event payload that is not a well-formed vLLM/SGLang batch.

    ``reason`` is one of a small fixed set of strings (see ``docs/events.md``)
    meant for a metrics label; the message says what exactly was wrong.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        #: Short machine-readable cause, e.g. ``"msgpack"``, ``"bad_hash"``.
        self.reason = reason


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Upper bounds a payload must respect; anything larger is a :class:`DecodeError`.

    The array-length bounds are also handed to msgpack (``max_array_len``, capped by
    the payload length, since every element costs at least one byte), so an array
    header that declares a huge length is refused before anything is allocated.
    """

    #: Largest payload accepted, in bytes.
    max_payload_bytes: int = 64 << 20
    #: Most events in one batch.
    max_events: int = 1 << 16
    #: Most block hashes in one event.
    max_hashes_per_event: int = 1 << 17
    #: Most token ids in one event.
    max_tokens_per_event: int = 1 << 21
    #: Longest str / bin value (type names, media, LoRA names, bytes hashes, extra keys).
    max_str_bytes: int = 1 << 16
    #: Most entries in one map (an event has ~15 fields).
    max_map_len: int = 1 << 10


DEFAULT_LIMITS = DecodeLimits()

#: Wire name of each tier in ``medium``.
MEDIUM_OF_TIER = {Tier.GPU: "GPU", Tier.HOST: "CPU", Tier.DISK: "STORAGE"}

#: Positional field order of the tagged-array event form (older vLLM), after the tag.
_ARRAY_FIELDS = {
    "BlockStored": (
        "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
        "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window",
        "locality", "ownership", "session_id", "lookahead_token_ids",
    ),
    "BlockRemoved": ("block_hashes", "medium", "group_idx", "locality", "ownership"),
    "AllBlocksCleared": (),
}

_LITTLE = sys.byteorder == "little"
_NO_ITEMS: tuple = ()


def _err(reason: str, message: str) -> DecodeError:
    return DecodeError(reason, message)


# ---------------------------------------------------------------- field parsers
def _hashes(v: Any, lim: DecodeLimits) -> tuple:
    if type(v) is not list:
        raise _err("bad_hashes", f"block_hashes must be an array, got {type(v).__name__}")
    if len(v) > lim.max_hashes_per_event:
        raise _err("too_many_hashes", f"{len(v)} block hashes > limit {lim.max_hashes_per_event}")
    try:  # fast path: all unsigned 64-bit ints, checked in C
        array.array("Q", v)
        if True not in v and False not in v:
            return tuple(v)
    except (TypeError, OverflowError):
        pass
    return tuple(_one_hash(h) for h in v)


def _one_hash(h: Any) -> Any:
    if type(h) is bool:
        raise _err("bad_hash", "a boolean is not a block hash")
    try:
        return normalize_engine_hash(h)
    except (TypeError, ValueError) as exc:
        raise _err("bad_hash", str(exc)) from None


def _tokens(v: Any, lim: DecodeLimits) -> tuple[tuple[int, ...], bytes]:
    """The token ids as a tuple and as uint32-LE bytes (validated in C by ``array``)."""
    if type(v) is not list:
        raise _err("bad_tokens", f"token_ids must be an array, got {type(v).__name__}")
    if len(v) > lim.max_tokens_per_event:
        raise _err("too_many_tokens", f"{len(v)} token ids > limit {lim.max_tokens_per_event}")
    try:
        a = array.array("I", v)  # ints in [0, 2**32 - 1], checked in C
    except (TypeError, OverflowError):
        raise _err("bad_tokens", "token ids must be integers in [0, 2**32 - 1]") from None
    if a.itemsize != 4:  # pragma: no cover - no mainstream platform
        return tuple(v), b""
    if not _LITTLE:  # pragma: no cover - big-endian hosts
        a.byteswap()
    return tuple(v), a.tobytes()


def _opt_int(v: Any, name: str) -> int | None:
    if v is None:
        return None
    if type(v) is not int or v < 0:
        raise _err("bad_field", f"{name} must be a non-negative int or nil, got {v!r:.40}")
    return v


def _opt_str(v: Any, name: str) -> str | None:
    if v is None or type(v) is str:
        return v
    raise _err("bad_field", f"{name} must be a string or nil, got {type(v).__name__}")


def _tier(v: Any) -> Tier:
    if v is None:
        return Tier.GPU
    if type(v) is not str:
        raise _err("bad_medium", f"medium must be a string or nil, got {type(v).__name__}")
    try:
        return Tier.parse(v)
    except ValueError:
        raise _err("bad_medium", f"unknown medium {v!r:.40}") from None


def _freeze(x: Any) -> Any:
    if type(x) is list:
        return tuple(_freeze(y) for y in x)
    if type(x) is dict:
        raise _err("bad_extra_keys", "extra keys must not contain maps")
    return x


def _extra_keys(v: Any, n_blocks: int) -> tuple | None:
    if v is None:
        return None
    if type(v) is not list:
        raise _err("bad_extra_keys", f"extra_keys must be an array or nil, got {type(v).__name__}")
    if v.count(None) == len(v):
        return None
    if len(v) != n_blocks:
        raise _err("bad_extra_keys", f"{len(v)} extra_keys entries for {n_blocks} blocks")
    out = []
    for e in v:
        if e is not None and type(e) is not list:
            raise _err("bad_extra_keys", f"an extra_keys entry must be an array or nil, got {type(e).__name__}")
        out.append(None if e is None else _freeze(e))
    return tuple(out)


# ---------------------------------------------------------------- event parsers
def _stored(ev: dict, lim: DecodeLimits) -> BlockStored:
    hashes = _hashes(ev.get("block_hashes"), lim)
    parent = ev.get("parent_block_hash")
    if parent is not None:
        parent = _one_hash(parent)
    raw_tokens = ev.get("token_ids")
    tokens, token_bytes = _tokens(raw_tokens, lim) if raw_tokens is not None else (_NO_ITEMS, b"")
    bs = ev.get("block_size", 0)
    if type(bs) is not int or bs < 0 or bs > lim.max_tokens_per_event:
        raise _err("bad_field", f"block_size must be a non-negative int, got {bs!r:.40}")
    if tokens and (bs == 0 or len(tokens) != len(hashes) * bs):
        raise _err("bad_token_count", f"{len(tokens)} tokens for {len(hashes)} blocks of {bs}")
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=bs,
        tier=_tier(ev.get("medium")),
        lora_name=_opt_str(ev.get("lora_name"), "lora_name"),
        extra_keys=_extra_keys(ev.get("extra_keys"), len(hashes)) if tokens else None,
        group_idx=_opt_int(ev.get("group_idx"), "group_idx"),
        spec_kind=_opt_str(ev.get("kv_cache_spec_kind"), "kv_cache_spec_kind"),
        token_bytes=token_bytes or None,
    )


def _removed(ev: dict, lim: DecodeLimits) -> BlockRemoved:
    return BlockRemoved(
        block_hashes=_hashes(ev.get("block_hashes"), lim),
        tier=_tier(ev.get("medium")),
        group_idx=_opt_int(ev.get("group_idx"), "group_idx"),
    )


def _cleared(ev: dict, lim: DecodeLimits) -> AllBlocksCleared:
    return AllBlocksCleared()


#: Event tag -> parser.  Adding an event kind means adding one entry here.
_PARSERS: dict[str, Callable[[dict, DecodeLimits], KVEvent]] = {
    "BlockStored": _stored,
    "BlockRemoved": _removed,
    "AllBlocksCleared": _cleared,
}


def _event(ev: Any, lim: DecodeLimits) -> KVEvent:
    if type(ev) is dict:
        tag = ev.get("type")
        parser = _PARSERS.get(tag) if type(tag) is str else None
        if parser is None:
            raise _err("unknown_event", f"unknown event type {tag!r:.60}")
        return parser(ev, lim)
    if type(ev) is list and ev and type(ev[0]) is str:  # tagged-array form
        tag = ev[0]
        parser = _PARSERS.get(tag)
        if parser is None:
            raise _err("unknown_event", f"unknown event type {tag!r:.60}")
        names = _ARRAY_FIELDS[tag]
        return parser(dict(zip(names, ev[1:])), lim)
    raise _err("bad_event", f"an event must be a map or a tagged array, got {type(ev).__name__}")


# ---------------------------------------------------------------------- decode
def decode(payload: bytes, *, limits: DecodeLimits | None = None) -> EventBatch:
    """Decode one vLLM/SGLang KV-event payload (msgpack) into an :class:`EventBatch`.

    Raises :class:`DecodeError` -- and nothing else -- for any malformed input:
    not bytes, too large, truncated or invalid msgpack, wrong field types,
    unknown event tags, arrays longer than ``limits`` allow.
    """
    lim = DEFAULT_LIMITS if limits is None else limits
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise _err("not_bytes", f"payload must be bytes, got {type(payload).__name__}")
    n = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
    if n > lim.max_payload_bytes:
        raise _err("too_large", f"payload of {n} bytes > limit {lim.max_payload_bytes}")
    arr_cap = max(min(n, max(lim.max_events, lim.max_hashes_per_event, lim.max_tokens_per_event)), 3)
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_array_len=arr_cap,
            max_map_len=min(lim.max_map_len, max(n, 1)),
            max_str_len=min(lim.max_str_bytes, max(n, 1)),
            max_bin_len=min(lim.max_str_bytes, max(n, 1)),
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises ValueError/TypeError/StackError/UnicodeDecodeError/...
        if isinstance(exc, ValueError) and "exceeds max_" in str(exc):
            raise _err("array_limit", f"a msgpack container or string exceeds the limits: {exc}"[:200]) from None
        raise _err("msgpack", f"undecodable msgpack: {type(exc).__name__}: {exc}"[:200]) from None
    if type(obj) is not list or len(obj) < 2:
        raise _err("bad_batch", "a batch must be an array [ts, events, dp_rank?]")
    ts, events = obj[0], obj[1]
    if type(ts) is int:
        ts = float(ts)
    elif type(ts) is not float or not math.isfinite(ts):
        raise _err("bad_batch", f"batch ts must be a finite number, got {ts!r:.40}")
    if type(events) is not list:
        raise _err("bad_batch", f"batch events must be an array, got {type(events).__name__}")
    if len(events) > lim.max_events:
        raise _err("too_many_events", f"{len(events)} events > limit {lim.max_events}")
    rank = obj[2] if len(obj) > 2 else None
    if rank is not None and (type(rank) is not int or rank < 0):
        raise _err("bad_batch", f"data_parallel_rank must be a non-negative int or nil, got {rank!r:.40}")
    try:
        decoded = tuple([_event(ev, lim) for ev in events])
    except DecodeError:
        raise
    except Exception as exc:  # defensive: any surprise in a parser is still a malformed payload
        raise _err("bad_event", f"{type(exc).__name__}: {exc}"[:200]) from None
    return EventBatch(ts=ts, events=decoded, dp_rank=rank)


# ------------------------------------------------------------- compiled decode
class PackedBatch:
    """A batch the compiled core parsed (:func:`decode_packed`); an :class:`EventBatch` stand-in.

    ``NativeKVIndex.apply`` applies ``native_frame`` in one core call; any other consumer reads
    ``events`` (built on first use, equal to what :func:`decode` gives) or iterates the batch.
    """

    __slots__ = ("native_frame", "_events")

    def __init__(self, frame: Any) -> None:
        #: The core's parsed payload (``kvroute.kvindex._kvcore.Frame``); read-only.
        self.native_frame = frame
        #: ``events`` once built; None before.
        self._events: tuple[KVEvent, ...] | None = None

    @property
    def ts(self) -> float:
        return self.native_frame.ts  # type: ignore[no-any-return]

    @property
    def dp_rank(self) -> int | None:
        return self.native_frame.dp_rank  # type: ignore[no-any-return]

    @property
    def n_events(self) -> int:
        return self.native_frame.n_events  # type: ignore[no-any-return]

    @property
    def has_clear(self) -> bool:
        return self.native_frame.has_clear  # type: ignore[no-any-return]

    @property
    def events(self) -> tuple[KVEvent, ...]:
        if self._events is None:
            self._events = tuple(_event_of(*r) for r in self.native_frame.raw())
        return self._events

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.events)

    def to_batch(self) -> EventBatch:
        """The same batch as an :class:`EventBatch`."""
        return EventBatch(ts=self.ts, events=self.events, dp_rank=self.dp_rank)


_TIER_OF_CODE = (Tier.GPU, Tier.HOST, Tier.DISK)


def _event_of(kind: int, tier: int, hashes: list, parent: Any, token_bytes: bytes, bs: int, group: Any, spec: Any) -> KVEvent:
    if kind == 0:
        toks = array.array("I", token_bytes)
        if not _LITTLE:  # pragma: no cover - big-endian hosts
            toks.byteswap()
        return BlockStored(tuple(hashes), parent, tuple(toks), bs, _TIER_OF_CODE[tier], None, None, group, spec,
                           token_bytes=token_bytes or None)
    if kind == 1:
        return BlockRemoved(tuple(hashes), _TIER_OF_CODE[tier], group)
    return AllBlocksCleared()


def decode_packed(payload: bytes, *, limits: DecodeLimits | None = None) -> "PackedBatch | EventBatch":
    """:func:`decode` by the compiled core when it runs: a :class:`PackedBatch`, else an EventBatch.

    Same results and the same :class:`DecodeError` s as :func:`decode`: the core parses only
    payloads it is sure of (plain prompts, unsigned int hashes, map events; see
    ``kvindex/_core/vllm_frame.hpp``) and hands every other one, malformed ones included, to
    :func:`decode`.
    """
    if _core is not None and type(payload) is bytes:
        lim = DEFAULT_LIMITS if limits is None else limits
        frame = _core.parse_frame(payload, (lim.max_payload_bytes, lim.max_events, lim.max_hashes_per_event,
                                            lim.max_tokens_per_event, lim.max_str_bytes, lim.max_map_len))
        if frame is not None:
            return PackedBatch(frame)
    return decode(payload, limits=limits)


# ---------------------------------------------------------------------- encode
def _wire_hash(h: Any) -> Any:
    return h if isinstance(h, (bytes, bytearray)) else int(h) & U64_MASK


def _event_fields(ev: KVEvent) -> list[tuple[str, Any]]:
    if isinstance(ev, BlockStored):
        fields: list[tuple[str, Any]] = [
            ("type", "BlockStored"),
            ("block_hashes", [_wire_hash(h) for h in ev.block_hashes]),
            ("parent_block_hash", None if ev.parent_block_hash is None else _wire_hash(ev.parent_block_hash)),
            ("token_ids", list(ev.token_ids)),
            ("block_size", ev.block_size),
            ("lora_id", None),
            ("medium", MEDIUM_OF_TIER[Tier.parse(ev.tier)]),
            ("lora_name", ev.lora_name),
        ]
        if ev.extra_keys is not None:
            fields.append(("extra_keys", [None if e is None else list(e) for e in ev.extra_keys]))
        if ev.group_idx is not None:
            fields.append(("group_idx", ev.group_idx))
        if ev.spec_kind is not None:
            fields.append(("kv_cache_spec_kind", ev.spec_kind))
        return fields
    if isinstance(ev, BlockRemoved):
        fields = [
            ("type", "BlockRemoved"),
            ("block_hashes", [_wire_hash(h) for h in ev.block_hashes]),
            ("medium", MEDIUM_OF_TIER[Tier.parse(ev.tier)]),
        ]
        if ev.group_idx is not None:
            fields.append(("group_idx", ev.group_idx))
        return fields
    if isinstance(ev, AllBlocksCleared):
        return [("type", "AllBlocksCleared")]
    raise TypeError(f"not a KV event: {type(ev).__name__}")


#: Map-header writers by layout: vLLM 0.33's msgspec always writes map16; 0.32 the shortest (fixmap).
_MAP_HEADERS = {
    "map16": lambda n: b"\xde" + n.to_bytes(2, "big"),
    "fixmap": msgpack.Packer().pack_map_header,
}


def encode(batch: EventBatch, *, map_header: str = "map16") -> bytes:
    """Encode a batch in vLLM's wire layout (the inverse of :func:`decode`).

    ``map_header="map16"`` writes every event map with a 3-byte map16 header, as
    vLLM 0.33's msgspec encoder does (byte-exact with the brief's sample);
    ``"fixmap"`` writes msgpack's shortest header, as vLLM 0.32 does.  The batch
    is always ``[ts, events, dp_rank]`` with nil for no rank, as vLLM writes it.
    Optional event fields that are None are omitted.
    """
    header = _MAP_HEADERS.get(map_header)
    if header is None:
        raise ValueError(f"map_header must be one of {sorted(_MAP_HEADERS)}, not {map_header!r}")
    pk = msgpack.Packer(use_bin_type=True, autoreset=True)
    parts = [pk.pack_array_header(3), pk.pack(float(batch.ts)), pk.pack_array_header(len(batch.events))]
    for ev in batch.events:
        fields = _event_fields(ev)
        parts.append(header(len(fields)))
        for k, v in fields:
            parts.append(pk.pack(k))
            parts.append(pk.pack(v))
    parts.append(pk.pack(batch.dp_rank))
    return b"".join(parts)
