"""A real host-memory KV block store for engines built on torch.

:class:`HostBlockStore` preallocates one tensor pool of ``num_blocks`` blocks of
a fixed shape and dtype (pinned memory when CUDA is available, so GPU<->host
copies can be asynchronous), and copies blocks in and out by block id (any
hashable: kvroute content hashes in practice).  Which blocks to keep is not its
business: a :class:`~kvroute.eviction.TieredCache` (or an engine's offload
manager) decides, and the store only holds the bytes.

torch is imported lazily, here only, so the rest of kvroute imports without it.

Layout: ``pool[slot]`` holds one block; ``_slot`` maps block id -> slot;
``_free`` is a stack of free slots.  Only the store's methods touch them.
"""
from __future__ import annotations

from typing import Any, Hashable, Iterable, Sequence

from .base import EvictionError


class HostStoreError(EvictionError):
    """Bad use of a host store: full, unknown block id, wrong shape or dtype."""


class HostStoreFullError(HostStoreError):
    """No free slot left for a new block."""


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise HostStoreError("the host store needs torch (pip install kvroute[torch])") from e
    return torch


class HostBlockStore:
    """Preallocated host pool of KV blocks, addressed by block id.

    ``block_shape`` is one block's shape (e.g. ``(2, layers, block_size, heads, head_dim)``),
    ``capacity_bytes`` the memory to use (rounded down to whole blocks, at least one).
    ``pin_memory``: None pins when CUDA is available.
    """

    def __init__(
        self,
        block_shape: Sequence[int],
        dtype: Any = None,
        capacity_bytes: int = 0,
        *,
        pin_memory: bool | None = None,
    ) -> None:
        torch = _torch()
        self._t = torch
        #: Element type of every block (fixed).
        self.dtype = dtype if dtype is not None else torch.float16
        #: Shape of one block (fixed).
        self.block_shape = tuple(int(x) for x in block_shape)
        if not self.block_shape or any(x <= 0 for x in self.block_shape):
            raise HostStoreError(f"bad block shape {block_shape!r}")
        elems = 1
        for x in self.block_shape:
            elems *= x
        #: Bytes per block.
        self.block_bytes = elems * torch.empty((), dtype=self.dtype).element_size()
        #: Number of block slots (fixed).
        self.num_blocks = int(capacity_bytes) // self.block_bytes
        if self.num_blocks < 1:
            raise HostStoreError(f"{capacity_bytes} bytes hold no block of {self.block_bytes} bytes")
        if pin_memory is None:
            pin_memory = bool(torch.cuda.is_available())
        #: Whether the pool is in pinned (page-locked) memory.
        self.pinned = bool(pin_memory)
        #: The pool: one row per slot.
        self.pool = torch.empty((self.num_blocks, *self.block_shape), dtype=self.dtype, pin_memory=self.pinned)
        self._slot: dict[Hashable, int] = {}
        self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))

    # ---------------------------------------------------------------- queries
    @property
    def capacity_bytes(self) -> int:
        """Bytes of the pool (whole blocks)."""
        return self.num_blocks * self.block_bytes

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._slot

    def free_blocks(self) -> int:
        return len(self._free)

    def block_ids(self) -> list[Hashable]:
        return list(self._slot)

    def slot_of(self, block_id: Hashable) -> int:
        try:
            return self._slot[block_id]
        except KeyError:
            raise HostStoreError(f"block {block_id!r} is not in the host store") from None

    # ------------------------------------------------------------------ copies
    def _check(self, t: Any, n: int | None = None) -> None:
        want = self.block_shape if n is None else (n, *self.block_shape)
        if tuple(t.shape) != want:
            raise HostStoreError(f"tensor of shape {tuple(t.shape)}, expected {want}")
        if t.dtype != self.dtype:
            raise HostStoreError(f"tensor of dtype {t.dtype}, expected {self.dtype}")

    def put(self, block_id: Hashable, block: Any, *, non_blocking: bool = False) -> int:
        """Copy one block in (overwriting it if present); returns its slot."""
        self._check(block)
        slot = self._slot.get(block_id)
        if slot is None:
            if not self._free:
                raise HostStoreFullError(f"host store full ({self.num_blocks} blocks)")
            slot = self._free.pop()
            self._slot[block_id] = slot
        self.pool[slot].copy_(block, non_blocking=non_blocking and self.pinned)
        return slot

    def put_many(self, block_ids: Sequence[Hashable], blocks: Any, *, non_blocking: bool = False) -> list[int]:
        """Copy ``len(block_ids)`` blocks (a tensor of shape (n, *block_shape)) in with one gather."""
        n = len(block_ids)
        self._check(blocks, n)
        new = [b for b in dict.fromkeys(block_ids) if b not in self._slot]
        if len(new) > len(self._free):
            raise HostStoreFullError(f"{len(new)} new blocks, {len(self._free)} free slots")
        for b in new:
            self._slot[b] = self._free.pop()
        slots = [self._slot[b] for b in block_ids]
        if blocks.device.type == "cpu":
            self.pool.index_copy_(0, self._t.tensor(slots, dtype=self._t.long), blocks)
        else:
            # straight into the pool, one copy per block: an asynchronous device-to-host copy into a
            # temporary followed by a CPU-side index_copy_ would read the temporary before it is filled
            nb = non_blocking and self.pinned
            for j, slot in enumerate(slots):
                self.pool[slot].copy_(blocks[j], non_blocking=nb)
        return slots

    def get(self, block_id: Hashable, out: Any = None, *, non_blocking: bool = False) -> Any:
        """Copy one block out (into ``out`` when given, e.g. a GPU tensor); returns the destination."""
        src = self.pool[self.slot_of(block_id)]
        if out is None:
            return src.clone()
        self._check(out)
        out.copy_(src, non_blocking=non_blocking and self.pinned)
        return out

    def get_many(self, block_ids: Sequence[Hashable], out: Any = None, *, non_blocking: bool = False) -> Any:
        """Copy blocks out as one tensor of shape (n, *block_shape) (into ``out`` when given)."""
        idx = self._t.tensor([self.slot_of(b) for b in block_ids], dtype=self._t.long)
        src = self.pool.index_select(0, idx)
        if out is None:
            return src
        self._check(out, len(block_ids))
        out.copy_(src, non_blocking=non_blocking and self.pinned)
        return out

    def remove(self, block_ids: Iterable[Hashable]) -> int:
        """Free the slots of these blocks (unknown ids are ignored); returns how many were freed."""
        n = 0
        for b in block_ids:
            slot = self._slot.pop(b, None)
            if slot is not None:
                self._free.append(slot)
                n += 1
        return n

    def clear(self) -> None:
        """Free every slot (the pool stays allocated)."""
        self._slot.clear()
        self._free = list(range(self.num_blocks - 1, -1, -1))

    def check_invariants(self) -> None:
        """Every slot is either free or holds exactly one block id."""
        used = list(self._slot.values())
        assert len(set(used)) == len(used), "two blocks share a slot"
        assert not set(used) & set(self._free), "a used slot is on the free list"
        assert len(set(self._free)) == len(self._free)
        assert sorted(used + self._free) == list(range(self.num_blocks))
