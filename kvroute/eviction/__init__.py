"""Workload-aware prefix eviction: one policy interface, the two-tier cache, the policies.

Map of the parts (this package stands on :mod:`kvroute.kvindex` only):

* :mod:`.base`       -- :class:`EvictionPolicy` (the interface every policy implements),
  :class:`HeapPolicy` (candidates in a lazily-invalidated heap), errors.
* :mod:`.tiered`     -- :class:`TieredCache`: blocks, prefix relations, pins, GPU + host
  tiers, engine-like events; :func:`index_follower` keeps a ``KVIndex`` in step.
* :mod:`.policies`   -- ``lru`` (vLLM order), ``lfu``, ``lrfu``, ``arc``, ``belady``
  (prefix-aware offline optimum), ``adaptive`` (the flagship), libcachesim wrappers.
* :mod:`.replay`     -- trace loading and block-level replay (prefix hit ratios).
* :mod:`.host_store` -- a torch host block store (torch imported lazily, only there).

Using the cache (keys are plain ints: a trace's chained ``hash_ids`` or kvroute
content hashes)::

    from kvroute.eviction import TieredCache
    cache = TieredCache(gpu_blocks=1000, host_blocks=4000, policy="adaptive", on_event=None)
    cache.lookup(keys)                 # -> (gpu_prefix_blocks, host_prefix_blocks), no side effects
    t = cache.start_request(keys, now) # touch + pin hits, promote host hits, insert + pin misses
    t.gpu_hit, t.host_hit, t.inserted, t.promoted
    cache.finish_request(t, now)       # unpin in reverse order (a prompt's tail is evicted first)
    cache.access(keys, now)            # both at once

Policies are registered by name in :data:`POLICIES` (name -> zero-argument
factory); :func:`make_policy` builds one.  ``belady`` needs the future:
``make_policy("belady", future=[keys, ...])``.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable

from .base import EvictionError, EvictionPolicy, HeapPolicy, PolicyUnavailableError, RequestInfo, UnknownPolicyError
from .tiered import RequestTicket, TieredCache, index_follower


def _lazy(module: str, cls: str, **fixed: Any) -> Callable[..., EvictionPolicy]:
    def factory(**kw: Any) -> EvictionPolicy:
        return getattr(importlib.import_module(module, __name__), cls)(**{**fixed, **kw})

    factory.__name__ = cls
    factory.__qualname__ = cls
    return factory


#: Policy name -> factory (keyword arguments are the policy's parameters).
POLICIES: dict[str, Callable[..., EvictionPolicy]] = {
    "lru": _lazy(".policies.lru", "LRU"),
    "lfu": _lazy(".policies.lfu", "LFU"),
    "lrfu": _lazy(".policies.lrfu", "LRFU"),
    "belady": _lazy(".policies.belady", "Belady"),
    "arc": _lazy(".policies.arc", "ARC"),
    "adaptive": _lazy(".policies.adaptive", "Adaptive"),
}

#: libcachesim policy wrappers, registered only when ``libcachesim`` is installed.
LIBCACHESIM_POLICIES = {"s3fifo": "S3FIFO", "sieve": "Sieve", "wtinylfu": "WTinyLFU", "lcs_arc": "ARC", "lcs_lru": "LRU"}
if importlib.util.find_spec("libcachesim") is not None:
    for _name, _cls in LIBCACHESIM_POLICIES.items():
        POLICIES[_name] = _lazy(".policies.libcachesim_wrap", "LibCacheSimPolicy", algorithm=_cls, label=_name)


def make_policy(name: str, **params: Any) -> EvictionPolicy:
    """Build a registered policy by name (``params`` go to its constructor)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise UnknownPolicyError(f"unknown eviction policy {name!r}; registered: {sorted(POLICIES)}") from None
    return factory(**params)


__all__ = [
    "EvictionError", "EvictionPolicy", "HeapPolicy", "LIBCACHESIM_POLICIES", "POLICIES", "PolicyUnavailableError",
    "RequestInfo", "RequestTicket", "TieredCache", "UnknownPolicyError", "index_follower", "make_policy",
]
