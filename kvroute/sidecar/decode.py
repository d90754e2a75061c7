"""Request payload -> request map, without holding the interpreter lock for a big int array.

``msgpack.unpackb`` turns a 2**21-item int array (a maximal prompt sent as ``token_ids`` array
rather than bytes) into 2M Python ints in one C call that holds the GIL for ~0.1-0.2 s, and the
service's checks then walk them again: every other client of the sidecar waits that long
(issue 17, item 9).  :func:`unpack_request` reads a payload over :data:`ARRAY_DECODE_BYTES`
item by item at the top level (``msgpack.Unpacker``) and hands the ``token_ids`` / ``hashes``
arrays to the compiled core (``_kvcore.unpack_uint_array``: uint32 / uint64 numpy arrays, GIL
released).  Everything else, and every payload with the pure-Python backend, is decoded by
``msgpack.unpackb`` with the same limits: the reference this path is tested against
(tests/test_sidecar_decode.py).

The result is the same map, except that those two arrays are numpy arrays; items the core does
not take (booleans, negative or too large ints, other types, a truncated array) give the
:class:`BadRequestError` the service gives for them on the reference path.
"""
from __future__ import annotations

from typing import Any

import msgpack

from ..kvindex.backend import core
from .errors import BadRequestError

#: Largest prompt accepted in one request (tokens).
MAX_TOKENS = 1 << 21
#: Payloads larger than this (the sidecar's big-request threshold) take the array path.
ARRAY_DECODE_BYTES = 64 << 10
#: Largest array or map in any other field (on the array path; no request op takes a big one).
NESTED_FIELD_BYTES = 64 << 10
#: msgpack limits of a request (a DoS bound on every field).
LIMITS = dict(max_bin_len=4 * MAX_TOKENS, max_array_len=MAX_TOKENS, max_str_len=1 << 20, max_map_len=64)
#: Fields read by the core, and the width of their items.
ARRAY_FIELDS = {"token_ids": 32, "hashes": 64}
#: The core's reasons for stopping at an item -> the message (``{field}``, ``{i}``: the item).
_REASONS = {
    1: "{field!r} must be ints, not booleans",
    2: "{field!r} item {i} is negative",
    3: "{field!r} item {i} is too large",
    4: "{field!r} item {i} is not an int",
    5: "not valid msgpack: {field!r} is truncated",
}
_MESSAGES = {
    ("token_ids", 2): "token ids must lie in [0, 2**32 - 1] (item {i} is negative)",
    ("token_ids", 3): "token ids must lie in [0, 2**32 - 1] (item {i} is larger)",
    ("token_ids", 4): "'token_ids' must be a list of ints or uint32-LE bytes (item {i} is not an int)",
    ("hashes", 1): "'hashes' must be a list of unsigned 64-bit ints",
    ("hashes", 2): "'hashes' must be a list of unsigned 64-bit ints",
    ("hashes", 3): "'hashes' must be a list of unsigned 64-bit ints",
    ("hashes", 4): "'hashes' must be a list of unsigned 64-bit ints",
}
_ARRAY_HEADERS = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}
_MAP_HEADERS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_CONTAINERS = _ARRAY_HEADERS | _MAP_HEADERS
#: bin 8 / 16 / 32 -> bytes of the length that follows
_BINS = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def unpack_request(payload: Any) -> Any:
    """The decoded payload (module docstring); raises :class:`BadRequestError` on what is not a
    valid request encoding.  ``payload``: bytes, or a buffer (the server passes a big message as a
    zero-copy memoryview: a bin field then comes back as a memoryview slice of it, not a copy)."""
    if len(payload) <= ARRAY_DECODE_BYTES or core is None:
        return _reference(payload)
    if not payload or payload[0] not in _MAP_HEADERS:
        raise BadRequestError("a request is a msgpack map")
    req: dict[Any, Any] = {}
    base = 0  # offset of ``unp``'s first byte in ``payload``
    unp = _unpacker(payload, 0)
    try:
        for _ in range(unp.read_map_header()):
            if payload[base + unp.tell()] in _CONTAINERS:
                raise BadRequestError("not valid msgpack: a map key must be a string, an int or bytes")
            key = unp.unpack()
            at = base + unp.tell()
            bits = ARRAY_FIELDS.get(key) if isinstance(key, str) else None
            t = payload[at] if at < len(payload) else None
            if bits is not None and t in _ARRAY_HEADERS:
                count = unp.read_array_header()
                if count > MAX_TOKENS:
                    raise BadRequestError(f"not valid msgpack: {count} exceeds max_array_len({MAX_TOKENS})")
                arr, end, taken, why = core.unpack_uint_array(payload, base + unp.tell(), count, bits)
                if taken < count:
                    msg = _MESSAGES.get((key, why)) or _REASONS.get(why, "{field!r} item {i} is not valid")
                    raise BadRequestError(msg.format(field=key, i=taken))
                req[key] = arr
                base, unp = end, _unpacker(payload, end)
            elif t in _BINS:  # a prompt as uint32-LE bytes: sliced out of the payload, not copied
                w = _BINS[t]
                size = int.from_bytes(payload[at + 1:at + 1 + w], "big")
                start = at + 1 + w
                if size > LIMITS["max_bin_len"]:
                    raise BadRequestError(f"not valid msgpack: {size} exceeds max_bin_len({LIMITS['max_bin_len']})")
                if start + size > len(payload):
                    raise BadRequestError(f"not valid msgpack: {key!r} is truncated")
                req[key] = payload[start:start + size]
                base = start + size
                unp = _unpacker(payload, base)
            elif t in _CONTAINERS:  # no other field is a big container: measured by skipping, not built
                unp.skip()
                size = base + unp.tell() - at
                if size > NESTED_FIELD_BYTES:
                    raise BadRequestError(f"field {key!r} holds {size} bytes of nested data; at most {NESTED_FIELD_BYTES}")
                req[key] = _reference(payload[at:at + size])
            else:
                req[key] = unp.unpack()
        if base + unp.tell() != len(payload):
            raise BadRequestError("not valid msgpack: extra data after the request map")
    except BadRequestError:
        raise
    except Exception as exc:
        raise BadRequestError(f"not valid msgpack: {exc}") from None
    return req


def _unpacker(payload: Any, offset: int) -> msgpack.Unpacker:
    return msgpack.Unpacker(_Reader(payload, offset), raw=False, strict_map_key=False, use_list=True, **LIMITS)


class _Reader:
    """``payload[offset:]`` as a file for ``msgpack.Unpacker``: each read copies what it returns,
    never the payload (which may be a zero-copy view of the socket's message)."""

    def __init__(self, payload: Any, offset: int) -> None:
        self._mv = memoryview(payload)
        self._pos = offset

    def read(self, n: int) -> bytes:
        out = bytes(self._mv[self._pos:self._pos + n])
        self._pos += len(out)
        return out


def _reference(payload: bytes) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True, **LIMITS)
    except Exception as exc:
        raise BadRequestError(f"not valid msgpack: {exc}") from None
