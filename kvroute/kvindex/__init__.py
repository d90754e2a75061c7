"""kvroute's ground floor: hashing, engine-neutral events and the KV index.

Map of the parts (this package imports no other kvroute package):

* :mod:`.types`    -- ``ContentHash`` vs ``EngineHash`` (distinct NewTypes), ``Tier``.
* :mod:`.hashing`  -- chained xxh3-64 content hashes of prompt blocks.
* :mod:`.events`   -- ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` / ``EventBatch``.
* :mod:`.index`    -- ``KVIndex``: which worker holds which block on which tier.
* :mod:`.errors`   -- ``KVRouteError`` and the ground floor's typed errors.
* :mod:`.atomic`   -- ``atomic_write``: temp file + fsync + rename (snapshots).
"""
from .errors import InvalidHashError, InvalidTokensError, KVRouteError, SnapshotError, UnknownWorkerError
from .events import AllBlocksCleared, ApplyResult, BlockRemoved, BlockStored, EventBatch, KVEvent
from .hashing import ROOT_SEED, block_hash_list, block_hashes, chain_hashes, tokens_to_bytes
from .index import KVIndex, Overlap
from .types import ContentHash, EngineHash, Tier, WorkerId, normalize_engine_hash

__all__ = [
    "AllBlocksCleared", "ApplyResult", "BlockRemoved", "BlockStored", "ContentHash", "EngineHash",
    "EventBatch", "InvalidHashError", "InvalidTokensError", "KVEvent", "KVIndex", "KVRouteError", "Overlap", "ROOT_SEED",
    "SnapshotError", "Tier", "UnknownWorkerError", "WorkerId", "block_hash_list", "block_hashes",
    "chain_hashes", "normalize_engine_hash", "tokens_to_bytes",
]
