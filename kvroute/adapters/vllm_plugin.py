"""vLLM general plugin: the GPU prefix cache evicts by a kvroute policy instead of LRU.

vLLM (entry point group ``vllm.general_plugins``, declared in ``pyproject.toml``)
calls :func:`register` in every engine process.  With
``KVROUTE_VLLM_GPU_EVICTION=<policy>`` in the engine's environment (a name in
:data:`kvroute.eviction.POLICIES`, e.g. ``adaptive``) it patches vLLM's v1
``BlockPool``; unset or empty, it does nothing and vLLM is stock.  It refuses,
with :class:`UnsupportedVLLMError` (which aborts the engine start), a vLLM
release outside :data:`SUPPORTED_VLLM`, an unknown policy, and a model with
more than one KV-cache group: the patch relies on internals of those releases.

Map of the parts:

* :class:`PolicyFreeQueue` -- drop-in for vLLM's ``FreeKVCacheBlockQueue`` (same
  methods: ``popleft``, ``popleft_n``, ``remove``, ``append``, ``append_n``,
  ``prepend_n``, ``get_all_free_blocks``, ``num_free_blocks``).  Free blocks
  are kept in four places, used for allocation in this order:

  1. ``_uncached``: blocks without a hash, in vLLM's order (a deque; vLLM
     prepends freed uncached blocks, LIFO, and starts with every block);
  2. ``_refused``: cached blocks the policy did not admit (see below);
  3. ``_dups``: cached blocks whose content another block already holds (vLLM
     recomputes the last block of a fully cached prompt into a new block);
  4. the policy's candidates: free cached blocks with no cached child.  The
     policy's ``victim()`` picks one; ``kvroute.eviction`` policies see the
     same calls as in :class:`kvroute.eviction.TieredCache` (``begin`` when a
     request is first scheduled, ``on_access`` on a hit, ``admit``/``on_insert``
     when vLLM caches a block, ``on_release`` tail first when a request frees
     its blocks, ``set_candidate``, ``victim``, ``on_remove``).

  Only leaves are candidates (a block whose cached children are all gone):
  a request holding block ``i`` holds blocks ``0..i``, so every free block has
  only free or evicted children and the deepest free block of a chain is
  always a leaf; should that ever fail, the oldest free cached block is
  evicted instead and counted in ``stats["fallback_evictions"]``.  The
  relations live in a :class:`kvroute.eviction.prefix_links.PrefixLinks`: a
  block whose parent left (a fallback eviction, a connector's
  ``evict_blocks``) remembers it and is linked again when vLLM re-caches that
  hash, since vLLM's lookup then reaches it through the parent again.
* ``_install`` -- wraps ``BlockPool.__init__`` (swap the queue),
  ``cache_full_blocks`` (inserts), ``touch`` (hits), ``reset_prefix_cache`` and
  ``evict_blocks`` (state resync), and ``KVCacheManager.get_computed_blocks``
  (``begin``, once per request).  Events, hashing and allocation counts are
  vLLM's own: only *which* cached block is reused changes.

Clock: a request may carry ``extra_args={"kvroute_now": seconds}`` in its
``SamplingParams`` (a replay passes trace time); otherwise ``time.monotonic()``.
Admission is off by default (``KVROUTE_VLLM_GPU_ADMISSION=1`` turns it on).
vLLM must compute every block of a prompt into a GPU block, so a refused block
still takes a block away from the cache while its request runs (a victim is
evicted for it); it only goes first afterwards.  Measured on the real CPU
engine (3,000 conversation requests, 5% of their unique blocks; commit
10c2b05), ``adaptive`` reached a block hit ratio of 0.0917 with admission and
0.1020 without (stock vLLM 0.0585); without admission the engine matches
kvroute's offline replay exactly, with it the offline replay (which never
stores a refused block) said 0.1126.  Current figures: docs/eviction.md,
"Inside real vLLM".  With admission on: when a request is first scheduled
(before vLLM allocates, and so evicts, anything for it) the policy is asked to
admit its missing blocks in chain order, as ``TieredCache`` asks; from the
first refusal on, the request's new blocks are still cached by vLLM (its
events stay exact) but, once free, are reused before any admitted block; one
that a later request hits while vLLM still holds it is admitted then.
"""
from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict, deque
from typing import Any, Hashable, Iterable

from kvroute.eviction.prefix_links import PrefixLinks
from kvroute.kvindex.errors import KVRouteError

__all__ = ["ENV_ADMISSION", "ENV_POLICY", "NOW_KEY", "SUPPORTED_VLLM", "PolicyFreeQueue", "UnsupportedVLLMError", "install", "register"]

log = logging.getLogger(__name__)

#: Environment variable naming the policy; unset or empty: stock vLLM.
ENV_POLICY = "KVROUTE_VLLM_GPU_EVICTION"
#: Environment variable turning admission on ("1"); unset: every block is admitted (see the module notes).
ENV_ADMISSION = "KVROUTE_VLLM_GPU_ADMISSION"
#: ``SamplingParams.extra_args`` key carrying a request's clock (seconds).
NOW_KEY = "kvroute_now"
#: vLLM releases whose BlockPool internals the patch was written and tested against.
SUPPORTED_VLLM = ("0.32.",)

#: The policy name installed in this process (None: not installed).
_installed: str | None = None


class UnsupportedVLLMError(KVRouteError, RuntimeError):
    """The plugin was asked to act on a vLLM (or a setup) it does not support."""


class PolicyFreeQueue:
    """vLLM's free-block queue, ordered by a kvroute eviction policy (see the module docstring).

    Owned by one ``BlockPool``; only that pool and the wrappers in ``_install`` call it.
    """

    def __init__(self, blocks: Iterable[Any], policy: Any, capacity: int, *, admission: bool = True) -> None:
        #: Free blocks without a hash, allocation order (left first).
        self._uncached: deque = deque(blocks)
        #: Free cached blocks the policy refused to admit: block id -> block (oldest first).
        self._refused: OrderedDict[int, Any] = OrderedDict()
        #: Free cached blocks duplicating a tracked block's content: block id -> block.
        self._dups: OrderedDict[int, Any] = OrderedDict()
        #: Free tracked blocks: key -> block (oldest release first, for the fallback).
        self._free: OrderedDict[Hashable, Any] = OrderedDict()
        #: Tracked cached blocks (free or in use): key -> block, block id -> key.
        self._block_of: dict[Hashable, Any] = {}
        self._key_of: dict[int, Hashable] = {}
        #: Prefix relations of tracked blocks (same keys as ``_block_of``); written by ``_track``,
        #: ``_forget`` and ``on_reset``.  An evicted parent re-cached later re-links its children.
        self.links = PrefixLinks()
        #: Blocks vLLM cached but the policy refused (untracked until evicted): block id -> key, key -> block id.
        self._refused_ids: dict[int, Hashable] = {}
        self._refused_keys: dict[Hashable, int] = {}
        #: Requests whose new blocks from a chain position on are refused: id -> first refused position.
        self._refuse_from: OrderedDict[Any, int] = OrderedDict()
        #: Requests already announced to the policy (``begin`` once per request): id -> blocks of its chain
        #: the policy has seen (the prompt's, then each response block ``on_cached`` passes to ``extend``).
        self._begun: OrderedDict[Any, int] = OrderedDict()
        #: The eviction policy (one instance per pool).
        self.policy = policy
        #: Whether the policy's admission is asked (fixed; the engine install passes ``ENV_ADMISSION``).
        self.admission = admission
        policy.bind(capacity)
        #: Current clock (seconds): the last request's ``kvroute_now`` or monotonic time.
        self.now = 0.0
        #: Counters (read by tests and logs).
        self.stats = {"evictions": 0, "fallback_evictions": 0, "refused": 0, "promoted": 0, "dup_reuses": 0, "requests": 0}
        self.num_free_blocks = len(self._uncached)

    # ------------------------------------------------- FreeKVCacheBlockQueue API
    def popleft(self) -> Any:
        if self.num_free_blocks == 0:
            raise ValueError("No free blocks available")
        return self.popleft_n(1)[0]

    def popleft_n(self, n: int) -> list[Any]:
        if n == 0:
            return []
        assert self.num_free_blocks >= n, (self.num_free_blocks, n)
        out: list[Any] = []
        unc = self._uncached
        while unc and len(out) < n:
            out.append(unc.popleft())
        for pool, label in ((self._refused, None), (self._dups, "dup_reuses")):
            while pool and len(out) < n:
                bid, b = pool.popitem(last=False)
                self._unrefuse(bid)
                if label:
                    self.stats[label] += 1
                out.append(b)
        while len(out) < n:
            key = self.policy.victim()
            if key is None or key not in self._free:
                key = next(iter(self._free))  # no leaf offered: evict the oldest free block
                self.stats["fallback_evictions"] += 1
            b = self._free.pop(key)
            self._forget(key)
            self.stats["evictions"] += 1
            out.append(b)
        self.num_free_blocks -= n
        return out

    def remove(self, block: Any) -> None:
        """A free block is taken by a hit (``BlockPool.touch``)."""
        bid = block.block_id
        key = self._key_of.get(bid)
        if key is not None and self._free.get(key) is block:
            del self._free[key]
            self.policy.set_candidate(key, False)
        elif bid in self._dups:
            del self._dups[bid]
        elif bid in self._refused:
            del self._refused[bid]
        else:
            self._uncached.remove(block)
        self.num_free_blocks -= 1

    def append(self, block: Any) -> None:
        self.append_n([block])

    def append_n(self, blocks: list[Any]) -> None:
        """Blocks whose last user finished, in vLLM's eviction order (a prompt's tail first)."""
        for b in blocks:
            key = b.block_hash
            if key is None:
                self._uncached.append(b)
            elif b.block_id in self._refused_ids:
                self._refused[b.block_id] = b
            elif self._key_of.get(b.block_id) == key and self._block_of.get(key) is b:
                self._release(key, b)
            elif key in self._block_of:
                self._dups[b.block_id] = b
            else:  # cached before we saw it (should not happen): track it as a root
                self._track(b, key, None)
                self.policy.on_insert(key, 0, self.now)
                self._release(key, b)
        self.num_free_blocks += len(blocks)

    def prepend_n(self, blocks: list[Any]) -> None:
        """Uncached blocks to reuse first, in the given order."""
        self._uncached.extendleft(reversed(blocks))
        self.num_free_blocks += len(blocks)

    def snapshot(self) -> dict[str, int]:
        """Counters plus the current sizes of the free pools (for tests and logs)."""
        return {**self.stats, "tracked": len(self._block_of), "uncached_free": len(self._uncached),
                "refused_free": len(self._refused), "dup_free": len(self._dups), "candidates_free": len(self._free)}

    def get_all_free_blocks(self) -> list[Any]:
        return [*self._uncached, *self._refused.values(), *self._dups.values(), *self._free.values()]

    # ------------------------------------------------------------ policy calls
    def begin(self, request_id: Any, keys: list[Hashable], now: float | None) -> None:
        """A request is scheduled for the first time (its prompt's full-block keys)."""
        self.now = time.monotonic() if now is None else float(now)
        if request_id in self._begun:
            return
        self._begun[request_id] = len(keys)
        if len(self._begun) > 65536:
            self._begun.popitem(last=False)
        self.stats["requests"] += 1
        pol = self.policy
        pol.begin(keys, self.now)
        if not self.admission:
            return
        # Admission, as TieredCache asks it: for the missing blocks in chain order, before
        # vLLM allocates (and so evicts) anything for this request.
        held, refused = self._block_of, self._refused_keys
        i = 0
        while i < len(keys) and (keys[i] in held or keys[i] in refused):  # what vLLM will hit
            i += 1
        while i < len(keys):
            if not pol.admit(keys[i], i, self.now):
                self._refuse_from[request_id] = i
                if len(self._refuse_from) > 65536:
                    self._refuse_from.popitem(last=False)
                break
            i += 1

    def on_hit(self, blocks: Iterable[Any]) -> None:
        """Hit blocks, in chain order.  A refused block that vLLM still had and a request
        now reuses is admitted after all (tracked from here on)."""
        pol = self.policy
        prev = None
        for depth, b in enumerate(blocks):
            key = b.block_hash
            if key is not None:
                if b.block_id in self._refused_ids and key not in self._block_of:
                    self._unrefuse(b.block_id)
                    self._track(b, key, prev)
                    pol.on_insert(key, depth, self.now)
                    self.stats["promoted"] += 1
                if self._key_of.get(b.block_id) == key:
                    pol.on_access(key, self.now)
            prev = key

    def on_cached(self, request_id: Any, blocks: list[Any], lo: int, hi: int) -> None:
        """vLLM gave blocks ``lo..hi-1`` of a request's chain their hashes.  Those past the prompt
        ``begin`` showed (its response, hashed as it is generated) are shown to the policy's ``extend``."""
        shown = self._begun.get(request_id)
        if shown is not None and shown < hi:
            keys = [b.block_hash for b in blocks[:hi]]
            if None not in keys:
                self.policy.extend(keys, shown, self.now)
                self._begun[request_id] = hi
        refuse_from = self._refuse_from.get(request_id, hi)
        for i in range(lo, hi):
            b = blocks[i]
            key = b.block_hash
            if key is None or b.block_id in self._key_of or b.block_id in self._refused_ids:
                continue
            if key in self._block_of:  # same content as a tracked block: a duplicate
                continue
            if i >= refuse_from:
                self._refused_ids[b.block_id] = key
                self._refused_keys[key] = b.block_id
                self.stats["refused"] += 1
                continue
            parent = blocks[i - 1].block_hash if i > 0 else None
            self._track(b, key, parent)
            self.policy.on_insert(key, i, self.now)

    def on_reset(self) -> None:
        """vLLM dropped every hash (prefix-cache reset): all free blocks are uncached now."""
        for key in list(self._block_of):
            self.policy.on_remove(key)
        self.policy.on_clear()
        self._uncached.extend([*self._refused.values(), *self._dups.values(), *self._free.values()])
        for d in (self._refused, self._dups, self._free, self._block_of, self._key_of, self.links):
            d.clear()
        self._refused_ids.clear()
        self._refused_keys.clear()
        self._refuse_from.clear()

    def resync(self) -> None:
        """Drop state of blocks whose hash vLLM changed behind our back (connector evictions)."""
        for key, b in list(self._block_of.items()):
            if b.block_hash != key:
                if self._free.get(key) is b:
                    del self._free[key]
                    self._uncached.append(b) if b.block_hash is None else self._dups.__setitem__(b.block_id, b)
                self._forget(key)
        for pool in (self._dups, self._refused):
            for bid, b in list(pool.items()):
                if b.block_hash is None:
                    del pool[bid]
                    self._unrefuse(bid)
                    self._uncached.append(b)

    # ---------------------------------------------------------------- internals
    def _unrefuse(self, bid: int) -> None:
        key = self._refused_ids.pop(bid, None)
        if key is not None and self._refused_keys.get(key) == bid:
            del self._refused_keys[key]

    def _track(self, b: Any, key: Hashable, parent: Hashable | None) -> None:
        self._block_of[key] = b
        self._key_of[b.block_id] = key
        p = self.links.add(key, parent)
        if p is not None and p in self._free:  # a request extended a free block's content through a duplicate
            self.policy.set_candidate(p, False)

    def _release(self, key: Hashable, b: Any) -> None:
        self.policy.on_release(key, self.now)
        self._free[key] = b
        if self.links.is_leaf(key):
            self.policy.set_candidate(key, True)

    def _forget(self, key: Hashable) -> None:
        """``key``'s block leaves the cache (evicted): unlink it, maybe expose its parent."""
        b = self._block_of.pop(key)
        self._key_of.pop(b.block_id, None)
        self.policy.on_remove(key)
        p = self.links.unlink(key)
        if p is not None and p in self._free:
            self.policy.set_candidate(p, True)


# --------------------------------------------------------------------- install
def _check_version() -> str:
    try:
        import vllm
    except ImportError as exc:
        raise UnsupportedVLLMError(f"{ENV_POLICY} is set but vLLM cannot be imported: {exc}") from exc

    v = getattr(vllm, "__version__", "unknown")
    if not v.startswith(SUPPORTED_VLLM):
        raise UnsupportedVLLMError(
            f"{ENV_POLICY} is set but kvroute's GPU eviction plugin supports vLLM {', '.join(s + 'x' for s in SUPPORTED_VLLM)} "
            f"only (found {v}); unset {ENV_POLICY} to run stock vLLM"
        )
    return v


def install(policy_name: str) -> None:
    """Patch vLLM's BlockPool in this process to evict by ``policy_name`` (idempotent)."""
    global _installed
    from kvroute.eviction import POLICIES, make_policy

    if policy_name not in POLICIES:
        raise UnsupportedVLLMError(f"{ENV_POLICY}={policy_name!r} is not a kvroute eviction policy; known: {sorted(POLICIES)}")
    if policy_name == "belady":
        raise UnsupportedVLLMError("belady needs the future and cannot run inside an engine")
    if _installed is not None:
        if _installed != policy_name:
            raise UnsupportedVLLMError(f"GPU eviction already installed with {_installed!r}, not {policy_name!r}")
        return
    flag = os.environ.get(ENV_ADMISSION, "").strip()
    if flag not in ("", "0", "1"):
        raise UnsupportedVLLMError(f"{ENV_ADMISSION}={flag!r}: use 1 (admission on) or 0 / unset (off)")
    admission = flag == "1"
    version = _check_version()
    from vllm.v1.core import block_pool as bp_mod
    from vllm.v1.core import kv_cache_manager as kvm_mod
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    BlockPool = bp_mod.BlockPool
    KVCacheManager = kvm_mod.KVCacheManager
    orig_init = BlockPool.__init__
    orig_cache = BlockPool.cache_full_blocks
    orig_touch = BlockPool.touch
    orig_reset = BlockPool.reset_prefix_cache
    orig_evict = BlockPool.evict_blocks
    orig_kvm_init = KVCacheManager.__init__
    orig_computed = KVCacheManager.get_computed_blocks

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        orig_init(self, *args, **kwargs)
        if type(self) is BlockPool and self.enable_caching:
            free = self.free_block_queue.get_all_free_blocks()
            for b in free:
                b.prev_free_block = b.next_free_block = None
            self.free_block_queue = PolicyFreeQueue(free, make_policy(policy_name), self.num_gpu_blocks - 1,
                                                    admission=admission)

    def cache_full_blocks(self, request: Any, blocks: list, num_cached_blocks: int, num_full_blocks: int, *args: Any, **kwargs: Any) -> None:
        orig_cache(self, request, blocks, num_cached_blocks, num_full_blocks, *args, **kwargs)
        q = self.free_block_queue
        if isinstance(q, PolicyFreeQueue) and num_full_blocks > num_cached_blocks:
            q.on_cached(request.request_id, blocks, num_cached_blocks, num_full_blocks)

    def touch(self, blocks: Any) -> None:
        orig_touch(self, blocks)
        q = self.free_block_queue
        if isinstance(q, PolicyFreeQueue):
            q.on_hit(blocks)

    def reset_prefix_cache(self) -> bool:
        ok = orig_reset(self)
        q = self.free_block_queue
        if ok and isinstance(q, PolicyFreeQueue):
            q.on_reset()
        return ok

    def evict_blocks(self, block_ids: set[int]) -> None:
        orig_evict(self, block_ids)
        q = self.free_block_queue
        if isinstance(q, PolicyFreeQueue):
            q.resync()

    def kvm_init(self, *args: Any, **kwargs: Any) -> None:
        orig_kvm_init(self, *args, **kwargs)
        if self.num_kv_cache_groups != 1 and isinstance(self.block_pool.free_block_queue, PolicyFreeQueue):
            raise UnsupportedVLLMError(
                f"{ENV_POLICY} supports models with one KV-cache group, this one has {self.num_kv_cache_groups}"
            )

    def get_computed_blocks(self, request: Any) -> Any:
        q = self.block_pool.free_block_queue
        if isinstance(q, PolicyFreeQueue):
            extra = getattr(request.sampling_params, "extra_args", None) or {}
            bs = self.block_pool.hash_block_size
            n = request.num_prompt_tokens // bs
            keys = [make_block_hash_with_group_id(h, 0) for h in request.block_hashes[:n]]
            q.begin(request.request_id, keys, extra.get(NOW_KEY))
        return orig_computed(self, request)

    BlockPool.__init__ = __init__
    BlockPool.cache_full_blocks = cache_full_blocks
    BlockPool.touch = touch
    BlockPool.reset_prefix_cache = reset_prefix_cache
    BlockPool.evict_blocks = evict_blocks
    KVCacheManager.__init__ = kvm_init
    KVCacheManager.get_computed_blocks = get_computed_blocks
    _installed = policy_name
    log.warning("kvroute: vLLM %s GPU prefix cache evicts by kvroute policy %r (%s; admission %s)", version,
                policy_name, ENV_POLICY, "on" if admission else "off")


def register() -> None:
    """vLLM general-plugin entry point: install when ``KVROUTE_VLLM_GPU_EVICTION`` names a policy."""
    name = os.environ.get(ENV_POLICY, "").strip()
    if name:
        install(name)
