"""Chained content hashes of prompt blocks.

Scheme (version 1, stable across processes, machines and PYTHONHASHSEED)::

    seed_0      = ROOT_SEED
    seed_i      = h_{i-1}                    (h_{-1} = ROOT_SEED)
    seed_i      = xxh3_64(msgpack(extras_i), seed=seed_i)   if block i has extra keys
    h_i         = xxh3_64(tokens of block i as uint32 little-endian, seed=seed_i)

so ``h_i`` depends on every token of blocks ``0..i`` and on every extra key of
those blocks: equal hash at position ``i`` means equal prefix up to block ``i``
(up to 64-bit collisions).  Only full blocks are hashed; a partial last block
is dropped, as every engine does.

Extra keys follow vLLM's per-block ``extra_keys`` so that hashes computed from
a prompt (router side) equal those computed from an engine's ``BlockStored``
event (index side): for block ``i`` the extras are ``[lora_name]`` (every block,
when a LoRA adapter is used), then the multimodal hashes whose placeholder
overlaps the block, then ``cache_salt`` (block 0 only).  A LoRA name, a salt or
an image therefore puts the prompt in a namespace of its own.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import array
import operator
import sys

import msgpack
import numpy as np
import xxhash

from .backend import core as _core
from .errors import InvalidTokensError
from .types import ContentHash

#: Seed of the first block of every chain ("kvroute" in ASCII).
ROOT_SEED = 0x6B76726F757465
#: Bumped whenever the scheme above changes; stored in snapshots.
HASH_SCHEME_VERSION = 1

_xxh3 = xxhash.xxh3_64_intdigest
_U32_MAX = (1 << 32) - 1
#: array('I') is uint32 little-endian on this platform (true on x86-64 and arm64).
_ARRAY_U32_LE = array.array("I").itemsize == 4 and sys.byteorder == "little"


def tokens_to_bytes(token_ids: Any) -> bytes:
    """Token ids (list, tuple, numpy array or torch tensor) as uint32 little-endian bytes."""
    if hasattr(token_ids, "detach") and hasattr(token_ids, "cpu"):  # torch.Tensor, without importing torch
        token_ids = token_ids.detach().cpu().numpy()
    if isinstance(token_ids, np.ndarray):
        arr = token_ids
        if arr.ndim != 1:
            raise InvalidTokensError(f"token ids must be one-dimensional, got shape {arr.shape}")
        if arr.dtype == np.dtype("<u4"):
            return arr.tobytes()
        if arr.dtype.kind not in "iu":
            raise InvalidTokensError(f"token ids must be integers, got dtype {arr.dtype}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _U32_MAX):
            raise InvalidTokensError("token ids must lie in [0, 2**32 - 1]")
        return arr.astype("<u4").tobytes()
    try:
        if _ARRAY_U32_LE:  # array.array is ~3x faster than numpy for a list of ints, and strict
            return array.array("I", token_ids).tobytes()
        arr = np.array(token_ids)
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidTokensError(f"token ids must be integers in [0, 2**32 - 1]: {exc}") from None
    return tokens_to_bytes(arr if arr.size else arr.astype(np.uint32))  # checked by the ndarray branch


def encode_extras(extras: Sequence[Any]) -> bytes:
    """Deterministic bytes of one block's extra keys (strings, bytes, ints, tuples)."""
    try:
        return msgpack.packb(list(extras), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidTokensError(f"extra keys must be str, bytes, int, None or tuples of them: {exc}") from None


def chain_hashes(
    token_bytes: bytes,
    block_size: int,
    *,
    seed: int = ROOT_SEED,
    extras: Sequence[Sequence[Any] | None] | None = None,
) -> list[ContentHash]:
    """Chained hashes of the full blocks in ``token_bytes`` (uint32 LE), as ints.

    ``seed`` is the previous block's content hash (``ROOT_SEED`` at a prompt's
    start).  ``extras[i]``, when given and non-empty, is mixed into block ``i``.
    The compiled core computes it when in use; :func:`py_chain_hashes` is the reference.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if _core is not None:
        return _core.chain_hashes(token_bytes, block_size, seed, _encode_all(extras))  # type: ignore[no-any-return]
    return py_chain_hashes(token_bytes, block_size, seed=seed, extras=extras)


def py_chain_hashes(
    token_bytes: bytes,
    block_size: int,
    *,
    seed: int = ROOT_SEED,
    extras: Sequence[Sequence[Any] | None] | None = None,
) -> list[ContentHash]:
    """The pure-Python reference of :func:`chain_hashes` (same arguments): one ``xxhash`` call a block."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    step = block_size * 4
    n = len(token_bytes) // step
    out: list[int] = []
    append = out.append
    h = seed
    if not extras:
        for off in range(0, n * step, step):
            h = _xxh3(token_bytes[off : off + step], h)
            append(h)
        return out  # type: ignore[return-value]
    for i, off in enumerate(range(0, n * step, step)):
        ex = extras[i] if i < len(extras) else None
        if ex:
            h = _xxh3(encode_extras(ex), h)
        h = _xxh3(token_bytes[off : off + step], h)
        append(h)
    return out  # type: ignore[return-value]


def _encode_all(extras: Sequence[Sequence[Any] | None] | None) -> list[bytes | None] | None:
    """Per-block extras as the bytes the chain mixes in (None for a block without extras)."""
    if not extras:
        return None
    return [encode_extras(ex) if ex else None for ex in extras]


def _is_torch(x: Any) -> bool:
    return hasattr(x, "detach") and hasattr(x, "cpu")


def _num_tokens(token_ids: Any) -> int:
    return token_ids.size if isinstance(token_ids, np.ndarray) else len(token_ids)


def native_prompt(token_ids: Any, block_size: int, lora_name: Any, cache_salt: Any, mm_hashes: Any) -> tuple[Any, Any]:
    """(token container the compiled core reads, encoded per-block extras) -- the compiled backend's hashing input."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if _is_torch(token_ids):
        token_ids = token_ids.detach().cpu().numpy()
    elif not isinstance(token_ids, (list, tuple, np.ndarray)):
        token_ids = tokens_to_bytes(token_ids)
        token_ids = np.frombuffer(token_ids, dtype="<u4")
    if lora_name is None and cache_salt is None and not mm_hashes:
        return token_ids, None
    n_blocks = _num_tokens(token_ids) // block_size
    return token_ids, _encode_all(block_extras(n_blocks, block_size, lora_name=lora_name, cache_salt=cache_salt, mm_hashes=mm_hashes))


def block_extras(
    n_blocks: int,
    block_size: int,
    *,
    lora_name: str | None = None,
    cache_salt: str | None = None,
    mm_hashes: Iterable[Any] | None = None,
) -> list[list[Any]] | None:
    """Per-block extra keys in vLLM's order (LoRA, multimodal, salt); None if there are none.

    ``mm_hashes`` items are either ``(hash, offset, length)`` -- the hash joins
    every block that overlaps tokens ``[offset, offset + length)``, as in vLLM --
    or a bare hash, which joins block 0 (a namespace for the whole prompt).
    """
    if lora_name is None and cache_salt is None and not mm_hashes:
        return None
    extras: list[list[Any]] = [[lora_name] if lora_name is not None else [] for _ in range(n_blocks)]
    for item in mm_hashes or ():
        if isinstance(item, (tuple, list)) and len(item) == 3:
            ident, offset, length = item
            try:
                offset, length = operator.index(offset), operator.index(length)
            except TypeError:
                offset = length = -1
            if offset < 0 or length <= 0:
                raise InvalidTokensError(f"bad multimodal placeholder {item!r} (int offset >= 0, int length > 0)")
            first, last = offset // block_size, (offset + length - 1) // block_size
            for b in range(first, min(last, n_blocks - 1) + 1):
                extras[b].append(ident)
        elif n_blocks:
            extras[0].append(item)
    if cache_salt is not None and n_blocks:
        extras[0].append(cache_salt)
    return extras


def block_hash_list(
    token_ids: Any,
    block_size: int,
    *,
    lora_name: str | None = None,
    cache_salt: str | None = None,
    mm_hashes: Iterable[Any] | None = None,
) -> list[ContentHash]:
    """Like :func:`block_hashes` but returns a list of Python ints (faster for dict lookups)."""
    if _core is not None:
        toks, enc = native_prompt(token_ids, block_size, lora_name, cache_salt, mm_hashes)
        out = _core.block_hash_list(toks, block_size, ROOT_SEED, enc)
        if out is None:  # a container the core does not read directly (e.g. a big-endian array)
            out = _core.chain_hashes(tokens_to_bytes(toks), block_size, ROOT_SEED, enc)
        return out  # type: ignore[no-any-return]
    return py_block_hash_list(token_ids, block_size, lora_name=lora_name, cache_salt=cache_salt, mm_hashes=mm_hashes)


def py_block_hash_list(
    token_ids: Any,
    block_size: int,
    *,
    lora_name: str | None = None,
    cache_salt: str | None = None,
    mm_hashes: Iterable[Any] | None = None,
) -> list[ContentHash]:
    """The pure-Python reference of :func:`block_hash_list`."""
    data = tokens_to_bytes(token_ids)
    n_blocks = len(data) // (4 * block_size) if block_size > 0 else 0
    extras = block_extras(n_blocks, block_size, lora_name=lora_name, cache_salt=cache_salt, mm_hashes=mm_hashes)
    return py_chain_hashes(data, block_size, extras=extras)


def block_hashes(
    token_ids: Any,
    block_size: int,
    *,
    lora_name: str | None = None,
    cache_salt: str | None = None,
    mm_hashes: Iterable[Any] | None = None,
) -> np.ndarray:
    """Chained content hashes of the full blocks of a prompt, as a numpy uint64 array.

    ``token_ids`` may be a list, a numpy array or a torch tensor.  A partial last
    block is not hashed.  ``lora_name``, ``cache_salt`` and ``mm_hashes`` put the
    prompt in its own namespace (see the module docstring).
    """
    if _core is not None:
        toks, enc = native_prompt(token_ids, block_size, lora_name, cache_salt, mm_hashes)
        arr = _core.block_hash_array(toks, block_size, ROOT_SEED, enc)
        if arr is None:
            arr = np.array(_core.chain_hashes(tokens_to_bytes(toks), block_size, ROOT_SEED, enc), dtype=np.uint64)
        return arr
    return np.array(
        py_block_hash_list(token_ids, block_size, lora_name=lora_name, cache_salt=cache_salt, mm_hashes=mm_hashes),
        dtype=np.uint64,
    )
