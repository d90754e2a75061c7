"""Engine-neutral KV-cache events, as plain frozen dataclasses.

Adapters (``kvroute.adapters``) turn an engine's wire format into these;
:meth:`kvroute.kvindex.KVIndex.apply` consumes them; the simulator's caches
emit them.  They carry engine hashes only: turning tokens into content hashes is
the index's job, because only it knows each worker's alias map.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from .types import EngineHash, Tier

#: KV-cache spec kinds whose blocks the index tracks.  Sliding-window, chunked
#: local attention and state-space groups keep only a window of the prompt, so a
#: prefix hit on them does not save a full prefill; their events are ignored.
INDEXED_SPEC_KINDS = frozenset({"full_attention", "mla_attention"})


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks an engine has just cached, in chain order."""

    #: The engine's hash of each block (normalised: unsigned int or bytes).
    block_hashes: tuple[EngineHash, ...]
    #: Engine hash of the block before the first one; None at a prompt's start.
    parent_block_hash: EngineHash | None
    #: All tokens of those blocks, concatenated; empty for a placeholder event
    #: (an offload tier announcing blocks it copied from the GPU).
    token_ids: tuple[int, ...]
    #: Tokens per block; 0 in a placeholder event.
    block_size: int
    #: Where the blocks now live.
    tier: Tier = Tier.GPU
    #: LoRA adapter name, when the engine reports one.
    lora_name: str | None = None
    #: Per-block extra keys (LoRA name, multimodal hashes, cache salt), or None.
    extra_keys: tuple[Any, ...] | None = None
    #: KV-cache group of a hybrid model; None for a single-group model.
    group_idx: int | None = None
    #: KV-cache spec kind of that group (e.g. "full_attention"), when reported.
    spec_kind: str | None = None
    #: ``token_ids`` as uint32 little-endian bytes, when the producer (a wire
    #: decoder) already has them; saves the index a conversion.  Must equal
    #: ``tokens_to_bytes(token_ids)``; not part of equality, hash or repr.
    token_bytes: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def is_placeholder(self) -> bool:
        """True for an offload event that names blocks without their tokens."""
        return not self.token_ids


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks an engine has evicted from one tier."""

    #: The engine's hashes of the evicted blocks.
    block_hashes: tuple[EngineHash, ...]
    #: The tier they left.
    tier: Tier = Tier.GPU
    #: KV-cache group of a hybrid model; None for a single-group model.
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The engine reset its prefix cache."""


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Events of one engine step, as published in one message."""

    #: The engine's wall-clock time of the step (epoch seconds).
    ts: float
    #: The step's events, in order.
    events: tuple[KVEvent, ...]
    #: Data-parallel rank of the publisher, when the payload carries one.
    dp_rank: int | None = None

    @property
    def n_events(self) -> int:
        """How many events the batch has."""
        return len(self.events)

    @property
    def has_clear(self) -> bool:
        """Whether one of the events is an ``AllBlocksCleared``."""
        return any(type(ev) is AllBlocksCleared for ev in self.events)


@dataclass(slots=True)
class ApplyResult:
    """What :meth:`KVIndex.apply` did with one batch (all counts in blocks)."""

    #: New (block, tier) entries.
    stored: int = 0
    #: (block, tier) entries removed.
    removed: int = 0
    #: Entries dropped by ``AllBlocksCleared``.
    cleared: int = 0
    #: Stored events whose parent (or placeholder block) this worker never announced.
    orphans: int = 0
    #: Removals of blocks the worker did not hold (already gone, or another group).
    unknown_removed: int = 0
    #: Events of groups the index does not track (sliding window etc.).
    ignored: int = 0
    #: GPU blocks announced again under the same engine hash while held (a second physical copy).
    copies_added: int = 0
    #: Removals that released one such copy (the block stays cached).
    copies_released: int = 0
    #: Stored events whose block size differs from the index's.
    block_size_mismatch: int = 0
    #: Stored events whose token count is not len(block_hashes) * block_size.
    malformed: int = 0
    #: One line per orphan event saying why it could not be applied (for logs).
    reasons: list[str] = field(default_factory=list)
