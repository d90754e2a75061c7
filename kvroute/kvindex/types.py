"""Plain value types shared by every kvroute part.

Two kinds of block hash travel through the system and must never be mixed:

* :data:`ContentHash` -- kvroute's own chained xxh3-64 of a block's tokens and
  extra keys (see :mod:`kvroute.kvindex.hashing`).  The index is keyed by it and
  the router computes it from a prompt, so it is identical in every process.
* :data:`EngineHash` -- whatever the engine calls the block in its KV events
  (vLLM: the low 64 bits of a sha256, or raw bytes; other engines: signed ints).
  It is opaque and may differ between workers; the index keeps a per-worker
  alias map from it to the content hash.
"""
from __future__ import annotations

import enum
from typing import Hashable, NewType, Union

#: kvroute's own chained content hash of one block (unsigned 64-bit int).
ContentHash = NewType("ContentHash", int)
#: The engine's name for a block: an unsigned 64-bit int (signed ints are
#: normalised to their unsigned bit pattern) or raw bytes.
EngineHash = NewType("EngineHash", Union[int, bytes])  # type: ignore[arg-type]
#: A worker's id: any hashable, msgpack-able value (str or int in practice).
WorkerId = Hashable

U64_MASK = (1 << 64) - 1


class Tier(enum.IntEnum):
    """Memory tier of a cached block, ordered fastest first."""

    GPU = 0
    HOST = 1
    DISK = 2

    @property
    def label(self) -> str:
        """The lower-case name used in APIs and JSON (``"gpu"``, ``"host"``, ``"disk"``)."""
        return self.name.lower()

    @classmethod
    def parse(cls, value: "Tier | str | int") -> "Tier":
        """Accept a Tier, its label, an engine medium (``GPU``/``CPU``/``STORAGE``) or its int."""
        if isinstance(value, Tier):
            return value
        if isinstance(value, str):
            try:
                return _TIER_NAMES[value.strip().lower()]
            except KeyError:
                raise ValueError(f"unknown tier or medium {value!r}; expected one of {sorted(_TIER_NAMES)}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value)
        raise ValueError(f"unknown tier {value!r}")


_TIER_NAMES = {
    "gpu": Tier.GPU,
    "host": Tier.HOST,
    "cpu": Tier.HOST,  # vLLM's medium name for the offload tier
    "disk": Tier.DISK,
    "storage": Tier.DISK,  # vLLM's medium name for disk/remote storage
}


def normalize_engine_hash(h: "int | bytes") -> EngineHash:
    """Map an engine hash to one canonical form: unsigned 64-bit int, or bytes."""
    if isinstance(h, bool):
        raise TypeError("a bool is not a block hash")
    if isinstance(h, int):
        if h < -(1 << 63) or h > U64_MASK:
            raise ValueError(f"engine hash {h} does not fit in 64 bits")
        return EngineHash(h & U64_MASK)
    if isinstance(h, (bytes, bytearray, memoryview)):
        return EngineHash(bytes(h))
    raise TypeError(f"an engine hash is an int or bytes, not {type(h).__name__}")
