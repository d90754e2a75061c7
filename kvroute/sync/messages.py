"""The replica-sync wire format: one msgpack map per published batch, validated on the way in.

A batch is what one replica publishes at once (one Redis stream entry)::

    {"v": 1, "o": origin, "n": seq, "t": wall-clock seconds at publish, "ops": [op, ...]}

``origin`` names one replica *incarnation* (``name/incarnation``: a restarted
replica is a new origin, so its dead predecessor's load expires on its own);
``seq`` counts that origin's batches from 1 (receivers drop ``seq`` they have
seen -- duplicates, replays -- and ask for the origin's state on a gap).
Each op is a msgpack array whose first item names it:

========  ======================================================================  ===========================
op        fields                                                                  receiver does
========  ======================================================================  ===========================
``"r"``   request id, worker, decode worker or nil, prefill tokens, blocks,       ``Router.track_remote``,
          seconds to its deadline or nil, hashes (u64 LE bytes), flags            ``add_pending``/``add_approx``
          (1: speculative, 2: approximate)
``"p"``   request id                                                              release its prefill load
``"f"``   request id                                                              release all its load
``"h"``   -- (heartbeat; every batch also proves the origin alive)                 renew the origin's lease
``"s"``   [[request id, worker, decode worker, prefill tokens, blocks,           replace the origin's flights
          prefill open, seconds left], ...]
``"q"``   target origin or nil (everyone), whether a catch-up copy of the         publish ``"s"`` (and ``"a"``)
          approximate entries is wanted
``"a"``   worker, [[hash, seconds left], ...] (oldest first)                      ``Router.approx_load``
========  ======================================================================  ===========================

Worker ids travel as msgpack str/int, a data-parallel ``(id, rank)`` as an
array (turned back into a tuple).  :func:`decode_batch` raises
:class:`SyncMessageError` on anything malformed; a bad op inside a good batch
is reported by the applier, which counts and skips it.
"""
from __future__ import annotations

from array import array
from typing import Any, Sequence

import msgpack

from ..kvindex.errors import KVRouteError

#: Version of the batch layout.
WIRE_VERSION = 1
#: Largest batch accepted (bytes) and largest op count.
MAX_BATCH_BYTES = 64 << 20
MAX_OPS = 1 << 20

ROUTE, PREFILL_DONE, FINISH, HEARTBEAT, STATE, QUERY, APPROX = "r", "p", "f", "h", "s", "q", "a"
FLAG_PENDING, FLAG_APPROX = 1, 2


class SyncMessageError(KVRouteError, ValueError):
    """A sync batch that is not valid msgpack or not of this layout."""


def pack_hashes(hashes: Sequence[int]) -> bytes:
    """Chained content hashes as u64 little-endian bytes."""
    return array("Q", hashes).tobytes() if hashes else b""


def unpack_hashes(raw: Any) -> list[int]:
    if not isinstance(raw, (bytes, bytearray)) or len(raw) % 8:
        raise SyncMessageError("hashes must be u64 little-endian bytes")
    a = array("Q")
    a.frombytes(raw)
    return a.tolist()


def encode_batch(origin: str, seq: int, ops: list[list[Any]], t: float = 0.0) -> bytes:
    return msgpack.packb({"v": WIRE_VERSION, "o": origin, "n": seq, "t": t, "ops": ops}, use_bin_type=True)


def batch_prefix(origin: str) -> bytes:
    """The first bytes of every batch :func:`encode_batch` writes for ``origin`` (map header, version, origin)."""
    full = encode_batch(origin, 1, [])
    head = b"\x85" + msgpack.packb("v") + msgpack.packb(WIRE_VERSION) + msgpack.packb("o") + msgpack.packb(origin)
    assert full.startswith(head)
    return head


def decode_batch(payload: Any) -> tuple[str, int, list[Any], float | None]:
    """``(origin, seq, ops, publish time or None)`` of a batch; :class:`SyncMessageError` if it is not one."""
    if not isinstance(payload, (bytes, bytearray)) or len(payload) > MAX_BATCH_BYTES:
        raise SyncMessageError("a sync batch is bytes of bounded size")
    try:
        doc = msgpack.unpackb(payload, raw=False, strict_map_key=False, max_array_len=MAX_OPS, max_map_len=16)
    except Exception as exc:
        raise SyncMessageError(f"not valid msgpack: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != WIRE_VERSION:
        raise SyncMessageError("not a version-1 sync batch")
    origin, seq, ops = doc.get("o"), doc.get("n"), doc.get("ops")
    if not isinstance(origin, str) or not origin:
        raise SyncMessageError("batch without an origin")
    if type(seq) is not int or seq < 1:
        raise SyncMessageError("batch without a positive sequence number")
    if not isinstance(ops, list):
        raise SyncMessageError("batch without an op list")
    t = doc.get("t")
    return origin, seq, ops, float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else None


def worker_id(v: Any) -> Any:
    """A worker id from the wire (a list is a data-parallel ``(id, rank)`` tuple)."""
    if isinstance(v, list):
        return tuple(v)
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise SyncMessageError(f"bad worker id {v!r}")
    return v


def request_id(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (str, int, bytes)):
        raise SyncMessageError(f"bad request id {v!r}")
    return v


def count(v: Any, what: str) -> int:
    if type(v) is not int or v < 0:
        raise SyncMessageError(f"{what} must be an int >= 0, got {v!r}")
    return v


def seconds(v: Any, what: str) -> float | None:
    """A duration from the wire: None, or a finite number."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise SyncMessageError(f"{what} must be a finite number or nil, got {v!r}")
    return float(v)
