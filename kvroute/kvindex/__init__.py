"""kvroute's ground floor: hashing, engine-neutral events and the KV index.

Map of the parts (this package imports no other kvroute package):

* :mod:`.types`    -- ``ContentHash`` vs ``EngineHash`` (distinct NewTypes), ``Tier``.
* :mod:`.hashing`  -- chained xxh3-64 content hashes of prompt blocks.
* :mod:`.events`   -- ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` / ``EventBatch``.
* :mod:`.index`    -- the reference ``KVIndex``: which worker holds which block on which tier.
* :mod:`.native`   -- ``NativeKVIndex``: the same on the compiled core (``_kvcore``, C++ in ``_core/``).
* :mod:`.backend`  -- which one runs (``BACKEND``; ``KVROUTE_PURE_PYTHON=1`` picks the reference);
  ``KVIndex`` exported here is that one.
* :mod:`.errors`   -- ``KVRouteError`` and the ground floor's typed errors.
* :mod:`.atomic`   -- ``atomic_write``: temp file + fsync + rename (snapshots).
"""
from .errors import InvalidHashError, InvalidTokensError, KVRouteError, SnapshotError, UnknownWorkerError
from .events import AllBlocksCleared, ApplyResult, BlockRemoved, BlockStored, EventBatch, KVEvent
from .hashing import ROOT_SEED, block_hash_list, block_hashes, chain_hashes, tokens_to_bytes
from .backend import BACKEND
from .index import KVIndex as PyKVIndex
from .index import Overlap

if BACKEND == "native":
    from .native import NativeKVIndex as KVIndex
else:
    KVIndex = PyKVIndex  # type: ignore[misc]
from .types import ContentHash, EngineHash, Tier, WorkerId, normalize_engine_hash

__all__ = [
    "BACKEND", "PyKVIndex", "AllBlocksCleared", "ApplyResult", "BlockRemoved", "BlockStored", "ContentHash", "EngineHash",
    "EventBatch", "InvalidHashError", "InvalidTokensError", "KVEvent", "KVIndex", "KVRouteError", "Overlap", "ROOT_SEED",
    "SnapshotError", "Tier", "UnknownWorkerError", "WorkerId", "block_hash_list", "block_hashes",
    "chain_hashes", "normalize_engine_hash", "tokens_to_bytes",
]
