"""kvroute eviction policies as vLLM ``CachePolicy`` classes for the CPU offload tier.

vLLM's ``OffloadingConnector`` (CPU tier, ``vllm/v1/kv_offload/cpu``) loads an
out-of-tree policy by class name and module::

    --kv-transfer-config '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"cpu_bytes_to_use": N,
        "eviction_policy": "KVRouteAdaptive",
        "cache_policy_module_path": "kvroute.adapters.vllm_cache_policy"}}'

Classes: one per kvroute policy (:class:`KVRouteLRU`, :class:`KVRouteLFU`,
:class:`KVRouteLRFU`, :class:`KVRouteARC`, :class:`KVRouteAdaptive`) and
:class:`KVRouteCachePolicy`, whose policy is named by ``KVROUTE_VLLM_CPU_EVICTION``
(default ``adaptive``).  Written against vLLM 0.32's ``CachePolicy`` (an import
of this module on another release raises
:class:`~kvroute.adapters.vllm_plugin.UnsupportedVLLMError`).  vLLM's native
offload worker needs CUDA/XPU; the tests drive vLLM's own
``CPUOffloadingManager`` with these classes on the CPU build.

How vLLM's calls map onto :class:`kvroute.eviction.EvictionPolicy`:

* ``on_store_miss(keys)`` (new chunks, before ``insert``) -> ``admit`` in order;
  from the first refusal on the chunks are still stored (the manager has
  allocated them) but are marked *refused* and evicted before any admitted chunk.
* ``insert`` -> ``on_insert``; ``touch`` -> ``on_access``; ``remove`` (failed
  store) and evictions -> ``on_remove``.
* ``on_request_finished(key_groups, ...)`` -> ``begin(keys)`` with the request's
  keys in prefix order (the policy learns per request, after the fact), then
  ``on_access`` for reused chunks and ``on_release`` tail first; consecutive keys
  give the prefix relations, kept in a
  :class:`kvroute.eviction.prefix_links.PrefixLinks` (a chunk whose predecessor
  was evicted remembers it and is linked again when that key is stored again).
* ``mark_evictable`` / ``mark_non_evictable`` (transfer ref counts) ->
  ``set_candidate``: a chunk is a candidate when it is evictable and no resident
  chunk extends it (leaves first, as in :class:`kvroute.eviction.TieredCache`).
* ``evict(n, protected)`` -> refused chunks first, then ``victim()`` repeatedly,
  skipping protected keys; atomic (on failure every change is rolled back).  If
  no leaf is left, the oldest evictable chunk goes (``stats["fallback_evictions"]``).

Clock: ``time.monotonic()``, or ``kv_transfer_params["kvroute_now"]`` of the
finishing request when given (trace replays).
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, Hashable

import vllm
from vllm.v1.kv_offload.cpu.policies.base import CachePolicy, ChunkStatus, order_request_keys

from kvroute.adapters.vllm_plugin import NOW_KEY, UnsupportedVLLMError
from kvroute.eviction import make_policy
from kvroute.eviction.prefix_links import PrefixLinks

__all__ = [
    "ENV_CPU_POLICY", "KVRouteCachePolicy", "KVRouteLRU", "KVRouteLFU", "KVRouteLRFU", "KVRouteARC", "KVRouteAdaptive",
]

#: Requests remembered between their first store and their end (see KVRouteCachePolicy._begin_early).
_MAX_BEGUN = 65536
#: Environment variable naming the policy of :class:`KVRouteCachePolicy`.
ENV_CPU_POLICY = "KVROUTE_VLLM_CPU_EVICTION"
#: vLLM releases whose CachePolicy interface this module implements.
SUPPORTED_VLLM = ("0.32.",)

if not vllm.__version__.startswith(SUPPORTED_VLLM):
    raise UnsupportedVLLMError(
        f"kvroute.adapters.vllm_cache_policy supports vLLM {', '.join(s + 'x' for s in SUPPORTED_VLLM)} only, "
        f"not {vllm.__version__}"
    )


class KVRouteCachePolicy(CachePolicy):
    """A vLLM CPU-tier ``CachePolicy`` backed by a kvroute eviction policy.

    All state below is owned by this object; vLLM's ``CPUOffloadingManager`` is
    its only caller (one instance per manager).
    """

    #: kvroute policy name; None: read ``KVROUTE_VLLM_CPU_EVICTION`` (default "adaptive").
    policy_name: str | None = None

    def __init__(self, cache_capacity: int) -> None:
        super().__init__(cache_capacity)
        name = self.policy_name or os.environ.get(ENV_CPU_POLICY, "").strip() or "adaptive"
        #: The kvroute policy's name and instance (rebuilt by ``clear``).
        self.name = name
        self.policy = self._new_policy()
        #: Resident chunks: key -> vLLM's ChunkStatus (ref_cnt -1 while its store is in flight).
        self.chunks: dict[Hashable, ChunkStatus] = {}
        #: Resident chunks with ref_cnt 0 (evictable), oldest first (for the fallback).
        self._evictable: OrderedDict[Hashable, None] = OrderedDict()
        #: Prefix relations among resident chunks (same keys as ``chunks``): added by ``insert``,
        #: linked by ``on_request_finished`` (consecutive keys), unlinked by ``_drop``, cleared by ``clear``.
        self.links = PrefixLinks()
        #: Keys the policy is offered as candidates right now.
        self._cand: set[Hashable] = set()
        #: Resident chunks the policy did not admit (evicted first).
        self._refused: set[Hashable] = set()
        #: Current clock (seconds).
        self.now = 0.0
        #: Requests whose prompt the policy was shown at their first store (req_id -> keys shown), so
        #: on_request_finished does not show it again; oldest first, bounded (aborted requests never finish).
        self._begun: OrderedDict[str, int] = OrderedDict()
        #: Counters.
        self.stats = {"evictions": 0, "refused": 0, "fallback_evictions": 0, "requests": 0}

    def _new_policy(self) -> Any:
        pol = make_policy(self.name)
        pol.bind(self.cache_capacity)
        return pol

    # ------------------------------------------------------------ helpers
    def _tick(self, req_context: Any = None) -> float:
        params = getattr(req_context, "kv_transfer_params", None) or {}
        t = params.get(NOW_KEY) if isinstance(params, dict) else None
        self.now = float(t) if t is not None else time.monotonic()
        return self.now

    def _refresh(self, key: Hashable) -> None:
        """Offer ``key`` as a candidate iff it is resident, evictable, admitted and a leaf."""
        want = key in self._evictable and key not in self._refused and self.links.is_leaf(key)
        if want != (key in self._cand):
            (self._cand.add if want else self._cand.discard)(key)
            self.policy.set_candidate(key, want)

    def _drop(self, key: Hashable) -> None:
        """``key`` leaves the tier (evicted or removed)."""
        self.chunks.pop(key, None)
        self._evictable.pop(key, None)
        self._refused.discard(key)
        if key in self._cand:
            self._cand.discard(key)
        self.policy.on_remove(key)
        if key in self.links:
            p = self.links.unlink(key)
            if p is not None:  # it just became a leaf
                self._refresh(p)

    # ------------------------------------------------------ CachePolicy API
    def get(self, key: Any) -> ChunkStatus | None:
        return self.chunks.get(key)

    def insert(self, key: Any, chunk: ChunkStatus) -> None:
        self.chunks[key] = chunk
        if key not in self.links:
            self.links.add(key)  # resident children remembering it are linked to it again
        self.policy.on_insert(key, 0, self.now)
        if chunk.ref_cnt == 0:
            self._evictable[key] = None
            self._refresh(key)

    def remove(self, key: Any) -> None:
        self._drop(key)

    def touch(self, keys: Iterable[Any], req_context: Any) -> None:
        now = self._tick(req_context)
        for k in keys:
            if k in self.chunks:
                self.policy.on_access(k, now)

    def _begin_early(self, req_context: Any, now: float) -> None:
        """Show the policy a request's prompt before its first store evicts anything.

        vLLM calls a CachePolicy's request hook (``on_request_finished``) only after the request's
        blocks were stored, and stores evict: without this, the policy would pick victims with the
        request's own hit prefix still looking old, and learn the request's class too late to admit
        its blocks by it.  The prompt is read from the keys the scheduler registered on the request
        (``ReqContext``'s key positions, vLLM 0.32: the prompt's blocks are hashed when the request is
        created).  The keys registered later, the blocks of its response, reach the policy's ``extend``
        when the request finishes."""
        rid = getattr(req_context, "req_id", None)
        positions = getattr(req_context, "_offload_key_positions", None)
        if rid is None or not isinstance(positions, dict) or not positions or rid in self._begun:
            return
        keys = [k for k, _ in sorted(positions.items(), key=lambda kv: kv[1])]
        self.policy.begin(keys, now)
        self._begun[rid] = len(keys)
        while len(self._begun) > _MAX_BEGUN:
            self._begun.popitem(last=False)

    def on_store_miss(self, keys: Iterable[Any], req_context: Any) -> None:
        now = self._tick(req_context)
        self._begin_early(req_context, now)
        keys = list(keys)
        positions = [req_context.get_offload_key_position(k) for k in keys]
        if None not in positions:
            keys = [k for _, k in sorted(zip(positions, keys), key=lambda pk: pk[0])]
        refusing = False
        for depth, k in enumerate(keys):
            if not refusing and not self.policy.admit(k, depth, now):
                refusing = True
            if refusing:
                self._refused.add(k)
                self.stats["refused"] += 1

    def on_request_finished(
        self,
        key_groups: Sequence[Sequence[Any]],
        insertion_only_keys: set,
        reused_keys: set,
        req_context: Any,
    ) -> None:
        now = self._tick(req_context)
        keys = order_request_keys(key_groups, req_context)
        pol = self.policy
        self.stats["requests"] += 1
        shown = self._begun.pop(getattr(req_context, "req_id", None), None)
        if shown is None:
            pol.begin(keys, now)
        elif shown < len(keys):  # its response's blocks, hashed as it was generated
            pol.extend(keys, shown, now)
        prev = None
        touched = []
        for k in keys:
            if k in self.chunks:
                if prev is not None and prev != k and prev in self.chunks and self.links.parent(k) is None \
                        and self.links.link(k, prev) is not None:  # prev just stopped being a leaf
                    self._refresh(prev)
                if k in reused_keys:
                    pol.on_access(k, now)
                touched.append(k)
            prev = k
        for k in reversed(touched):  # a prompt's tail is released first
            pol.on_release(k, now)
            if k in self._cand:  # re-offer with its new priority
                self._cand.discard(k)
                pol.set_candidate(k, False)
            self._refresh(k)

    def evict(self, n: int, protected: set) -> list[tuple[Any, ChunkStatus]] | None:
        if n == 0:
            return []
        chosen: list[Any] = []
        hidden: list[Any] = []  # protected candidates withdrawn while selecting
        for k in list(self._refused):
            if len(chosen) == n:
                break
            if k in self._evictable and k not in protected:
                chosen.append(k)
        pol = self.policy
        taken = set(chosen)
        while len(chosen) < n:
            k = pol.victim()
            if k is None:
                break
            pol.set_candidate(k, False)
            self._cand.discard(k)
            if k in protected:
                hidden.append(k)
                continue
            chosen.append(k)
            taken.add(k)
            p = self.links.parent(k)  # its parent may become a leaf for the next pick
            if p is not None and p not in taken and p in self._evictable and p not in self._refused \
                    and self.links.children(p) <= taken and p not in self._cand:
                self._cand.add(p)
                pol.set_candidate(p, True)
        fallback = 0
        if len(chosen) < n:
            for k in self._evictable:
                if len(chosen) == n:
                    break
                if k not in taken and k not in protected:
                    chosen.append(k)
                    taken.add(k)
                    fallback += 1
        for k in hidden:
            self._refresh(k)
        if len(chosen) < n:  # atomic: nothing changes
            for k in taken:
                if k in self._cand:
                    self._cand.discard(k)
                    pol.set_candidate(k, False)
                self._refresh(k)
            for k in list(self._cand):
                self._refresh(k)
            return None
        out = []
        for k in chosen:
            chunk = self.chunks[k]
            assert chunk.ref_cnt == 0
            out.append((k, chunk))
            self._drop(k)
        self.stats["evictions"] += len(out)
        self.stats["fallback_evictions"] += fallback
        return out

    def clear(self) -> None:
        self.chunks.clear()
        self._evictable.clear()
        self.links.clear()
        self._cand.clear()
        self._refused.clear()
        self._begun.clear()
        self.policy = self._new_policy()

    def mark_evictable(self, key: Any) -> None:
        self._evictable[key] = None
        self._refresh(key)

    def mark_non_evictable(self, key: Any) -> None:
        self._evictable.pop(key, None)
        self._refresh(key)


class KVRouteLRU(KVRouteCachePolicy):
    """kvroute ``lru`` (vLLM free-queue order, leaves first)."""

    policy_name = "lru"


class KVRouteLFU(KVRouteCachePolicy):
    """kvroute ``lfu``."""

    policy_name = "lfu"


class KVRouteLRFU(KVRouteCachePolicy):
    """kvroute ``lrfu`` (Lee et al. 1999)."""

    policy_name = "lrfu"


class KVRouteARC(KVRouteCachePolicy):
    """kvroute ``arc`` (prefix-aware ARC)."""

    policy_name = "arc"


class KVRouteAdaptive(KVRouteCachePolicy):
    """kvroute ``adaptive`` (learned hit density, admission)."""

    policy_name = "adaptive"
