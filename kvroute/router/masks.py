"""One walk shared by the router's per-worker bitmask tables (``ActiveBlocks``, ``ApproxPrefixes``).

Each table maps a content hash to a bitmask of worker slots.  :func:`chain_depths` walks a
prompt's chain once, intersecting masks, and reports for every slot how many leading blocks
it holds -- O(blocks + slots), never O(blocks x slots).
"""
from __future__ import annotations

from typing import Callable, Sequence


def chain_depths(get: Callable[[int, int], int], hashes: Sequence[int]) -> dict[int, int]:
    """{slot: n >= 1}: the first ``n`` hashes' masks (``get(hash, 0)``) all have the slot's bit."""
    mask = get(hashes[0], 0) if hashes else 0
    out: dict[int, int] = {}
    i, n = 1, len(hashes)
    while i < n and mask:
        m = mask & get(hashes[i], 0)
        gone = mask & ~m
        while gone:
            low = gone & -gone
            out[low.bit_length() - 1] = i
            gone ^= low
        mask = m
        i += 1
    while mask:
        low = mask & -mask
        out[low.bit_length() - 1] = n
        mask ^= low
    return out
