"""The two-tier prefix cache: blocks, prefix relations, pins and tiers; policies pick victims.

:class:`TieredCache` keeps chained blocks (plain int keys: a trace's ``hash_ids``
or kvroute content hashes) on two tiers, GPU and host, each of a capacity in
blocks.  It owns the structure; one :class:`~kvroute.eviction.base.EvictionPolicy`
per tier only picks victims among the tier's *candidates*.

Rules (checked by :meth:`TieredCache.check_invariants`):

* Tiers are exclusive: a block lives on exactly one tier.
* Prefix relations live in one :class:`~kvroute.eviction.prefix_links.PrefixLinks`
  (the structure the vLLM adapters use too); here a block's parent is always
  cached, so its orphan rule never applies.
* A cached block's parent is cached, and a GPU block's parent is on the GPU
  (the GPU holds the head of every cached prefix, the host its continuation).
* GPU candidates are unpinned GPU blocks with no child on the GPU; host
  candidates are host blocks with no cached child.  So eviction takes leaves
  first and never leaves a cached block whose parent is gone.
* GPU eviction demotes the block to the host (when the host tier exists and its
  policy admits it), otherwise drops it together with any host descendants.
  Host eviction drops.  A host hit promotes the block back to the GPU.
* Only GPU blocks are pinned (a request pins its hits and the blocks it inserts
  until :meth:`TieredCache.finish_request`).
* Admission: blocks the GPU policy refuses (and the rest of their prompt) are
  stored straight on the host when the host policy admits them, else not cached.
  An engine's GPU pool cannot refuse (every block a request computes is in a
  GPU block while it runs): ``gpu_admission=False`` models that, the GPU tier
  then takes every block it has room for and its policy only orders evictions.

A request is served in two calls (the simulator interleaves many)::

    t = cache.start_request(keys, now)   # hits touched + pinned, host hits promoted,
                                          # missing blocks admitted/inserted + pinned
    t.gpu_hit, t.host_hit, t.inserted     # blocks
    cache.finish_request(t, now)          # unpin in reverse (tail released first)

or in one: ``cache.access(keys, now)``.  :meth:`TieredCache.lookup` reports the
longest cached prefix with no side effects.  A key continues a prefix only when
it is cached *under the previous key* (with chained hashes that is always so).

Every change is reported to ``on_event`` as one
:class:`~kvroute.kvindex.events.EventBatch` per call, with placeholder
``BlockStored`` (keys as engine hashes, tier GPU/HOST) and ``BlockRemoved``
events; :func:`index_follower` turns such batches into
:meth:`KVIndex.store`/:meth:`KVIndex.remove` calls, so an index following the
cache stays exact.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from ..kvindex.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from ..kvindex.types import Tier
from .base import EvictionError, EvictionPolicy, RequestInfo
from .prefix_links import PrefixLinks

_GPU, _HOST = 0, 1


@dataclass(slots=True)
class RequestTicket:
    """What :meth:`TieredCache.start_request` did; hand it back to ``finish_request``."""

    #: The request's keys as given.
    keys: tuple
    #: Longest cached prefix found on the GPU, in blocks.
    gpu_hit: int = 0
    #: Blocks of the prefix after ``gpu_hit`` found on the host.
    host_hit: int = 0
    #: Of the host hits, how many were promoted to the GPU.
    promoted: int = 0
    #: Missing blocks inserted on the GPU.
    inserted: int = 0
    #: Missing blocks the GPU policy refused that went straight to the host tier.
    stored_host: int = 0
    #: Keys pinned by this request, in chain order (hits then inserts).
    pinned: list = field(default_factory=list)
    #: True once finish_request ran.
    finished: bool = False
    #: The cache's clear() count when the request started: a ticket from before a clear pins nothing.
    epoch: int = 0
    #: The cache that issued it (finish_request refuses another cache's ticket).
    owner: Any = field(default=None, repr=False, compare=False)

    @property
    def hit(self) -> int:
        """Blocks of the prompt served from cache (GPU + host)."""
        return self.gpu_hit + self.host_hit

    @property
    def uncached(self) -> int:
        """Blocks neither hit nor cached by this request (admission refused, no room)."""
        return len(self.keys) - self.gpu_hit - self.host_hit - self.inserted - self.stored_host


def _make_policy(p: "str | EvictionPolicy | Callable[[], EvictionPolicy]") -> EvictionPolicy:
    if isinstance(p, EvictionPolicy):
        return p
    if isinstance(p, str):
        from . import make_policy

        return make_policy(p)
    if callable(p):
        pol = p()
        if not isinstance(pol, EvictionPolicy):
            raise EvictionError(f"policy factory returned {type(pol).__name__}, not an EvictionPolicy")
        return pol
    raise EvictionError(f"not a policy: {p!r}")


class TieredCache:
    """GPU + host prefix cache of ``gpu_blocks`` and ``host_blocks`` blocks.

    ``policy`` (GPU tier) is a registered name, an :class:`EvictionPolicy`
    instance or a zero-argument factory; ``host_policy`` defaults to a fresh copy
    of the same (a deep copy of an unused instance).  ``on_event`` receives one
    ``EventBatch`` per mutating call; ``clock`` supplies ``now`` when a call
    gives none (default: the number of requests started so far).
    """

    def __init__(
        self,
        gpu_blocks: int,
        host_blocks: int = 0,
        policy: "str | EvictionPolicy | Callable[[], EvictionPolicy]" = "lru",
        *,
        host_policy: "str | EvictionPolicy | Callable[[], EvictionPolicy] | None" = None,
        on_event: Callable[[EventBatch], Any] | None = None,
        clock: Callable[[], float] | None = None,
        gpu_admission: bool = True,
    ) -> None:
        if not isinstance(gpu_blocks, int) or gpu_blocks < 0 or not isinstance(host_blocks, int) or host_blocks < 0:
            raise EvictionError(f"capacities must be non-negative ints, got {gpu_blocks!r}, {host_blocks!r}")
        if not isinstance(gpu_admission, bool):
            raise EvictionError(f"gpu_admission must be a bool, got {gpu_admission!r}")
        gp = _make_policy(policy)
        if host_policy is None:
            if not host_blocks:
                hp = _make_policy("lru")  # never called: the tier has no room
            elif isinstance(policy, EvictionPolicy):
                try:
                    hp = copy.deepcopy(gp)
                except TypeError as e:
                    raise EvictionError(f"cannot copy policy {gp.name} for the host tier; pass host_policy") from e
            else:
                hp = _make_policy(policy)
        else:
            hp = _make_policy(host_policy)
        if hp is gp:
            raise EvictionError("the GPU and host tiers need distinct policy instances")
        gp.bind(gpu_blocks)
        if host_blocks:
            if hasattr(hp, "tier_role"):  # a policy that models the whole cache from its host tier (adaptive)
                hp.tier_role, hp.upper_capacity = "host", gpu_blocks
            hp.bind(host_blocks)
            if hasattr(gp, "follow") and type(hp) is type(gp):  # adaptive: GPU follows the host's duel
                gp.follow(hp)
        #: Capacity per tier in blocks [gpu, host]; fixed.
        self.capacity = (gpu_blocks, host_blocks)
        #: Policy per tier [gpu, host]; only this cache calls their hooks.
        self.policies = (gp, hp)
        #: Whether the GPU policy's admit() is asked (False: an engine's GPU pool, which must take every
        #: block a request computes; the host tier's admission still applies); fixed.
        self.gpu_admission = gpu_admission
        #: Event sink (None: no events are built).
        self.on_event = on_event
        self._clock = clock
        self._auto_now = itertools.count()
        #: Number of clear() calls: tickets started before the latest one hold no pins.
        self._epoch = 0
        #: key -> tier (0 GPU, 1 host) of every cached block.
        self._tier: dict[Hashable, int] = {}
        #: Prefix relations of every cached block (both tiers): parent and children, the one structure the
        #: vLLM adapters use too.  A cached block's parent is always cached here (eviction takes leaves,
        #: a dropped block's subtree goes with it), so the orphan rule never applies.  Written by _add,
        #: _remove and clear only.
        self._links = PrefixLinks()
        #: ``self._links.parents`` (key -> parent key, None at a chain's start), for the hot loops; read-only.
        self._parent = self._links.parents
        #: key -> 0-based chain position of every cached block.
        self._depth: dict[Hashable, int] = {}
        #: key -> number of children on the GPU (only when > 0).
        self._kids_gpu: dict[Hashable, int] = {}
        #: key -> pin count (only when > 0; GPU blocks only).
        self._pins: dict[Hashable, int] = {}
        #: Keys the cache has told its tier's policy are candidates, per tier.
        self._cand: tuple[set, set] = (set(), set())
        #: Host blocks of the prefix being promoted: kept out of the host candidates meanwhile.
        self._protected: set = set()
        #: Blocks per tier [gpu, host].
        self._n = [0, 0]
        #: Events gathered during the current call: (kind, tier, key, parent).
        self._pending: list[tuple[str, int, Hashable, Hashable | None]] = []
        #: Counters (blocks unless named otherwise) -- see :meth:`stats`.
        self._stats = dict.fromkeys(
            ("requests", "blocks", "gpu_hits", "host_hits", "inserted", "stored_host", "promoted", "demoted",
             "dropped_gpu", "dropped_host", "refused", "no_room", "conflicts"), 0)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._tier)

    def __contains__(self, key: object) -> bool:
        return key in self._tier

    def tier_of(self, key: Hashable) -> Tier | None:
        """The tier holding ``key``, or None."""
        t = self._tier.get(key)
        return None if t is None else Tier(t)

    def blocks(self) -> dict[Hashable, Tier]:
        """Every cached block with its tier (for tests and tools)."""
        return {k: Tier(t) for k, t in self._tier.items()}

    def used(self) -> tuple[int, int]:
        """Blocks held per tier (gpu, host)."""
        return self._n[0], self._n[1]

    def pinned(self, key: Hashable) -> int:
        """Pin count of ``key`` (0 when unpinned or absent)."""
        return self._pins.get(key, 0)

    def stats(self) -> dict[str, int]:
        """Counters: requests, blocks looked up, gpu/host hits, inserted (GPU), stored_host
        (refused by the GPU policy, stored on the host), promoted, demoted,
        dropped (gpu/host), refused by admission, no_room (GPU full of pinned blocks),
        conflicts (a key cached under another parent)."""
        return dict(self._stats)

    def lookup(self, keys: Sequence[Hashable]) -> tuple[int, int]:
        """Longest cached prefix of ``keys``: (blocks on GPU, blocks after them on host). No side effects."""
        tier, parent = self._tier, self._parent
        prev = None
        g = h = 0
        for k in keys:
            t = tier.get(k)
            if t is None or parent[k] != prev:
                break
            if t == _GPU and not h:
                g += 1
            else:
                h += 1
            prev = k
        return g, h

    def _now(self, now: float | None) -> float:
        if now is not None:
            return now
        if self._clock is not None:
            return self._clock()
        return float(next(self._auto_now))

    # ---------------------------------------------------------------- requests
    def start_request(self, keys: Sequence[Hashable], now: float | None = None,
                      info: RequestInfo | None = None) -> RequestTicket:
        """Serve a request's prompt: touch and pin hits, promote host hits, insert and pin the rest.
        ``info``: what else is known of the request (output length, client hints), for the policies."""
        now = self._now(now)
        keys = tuple(keys)
        gp, hp = self.policies
        if info is not None:
            gp.request_info(info)
            if self.capacity[1]:
                hp.request_info(info)
        gp.begin(keys, now)
        if self.capacity[1]:
            hp.begin(keys, now)
        tk = RequestTicket(keys, epoch=self._epoch, owner=self)
        st = self._stats
        st["requests"] += 1
        st["blocks"] += len(keys)
        tier, parent, pins = self._tier, self._parent, self._pins
        gcand = self._cand[_GPU]
        pinned = tk.pinned
        n = len(keys)
        i = 0
        prev = None
        # 1. the cached prefix
        while i < n:
            k = keys[i]
            t = tier.get(k)
            if t is None or parent[k] != prev:
                break
            if t == _GPU:
                if tk.host_hit:  # cannot happen: a GPU block's parent is on the GPU
                    raise EvictionError("GPU block below a host block")  # pragma: no cover
                tk.gpu_hit += 1
                if k in gcand:
                    gcand.discard(k)
                    gp.set_candidate(k, False)
                pins[k] = pins.get(k, 0) + 1
                gp.on_access(k, now)
                pinned.append(k)
            else:
                if not tk.host_hit:
                    protected = self._protect_host(keys, i)
                tk.host_hit += 1
                if len(pinned) == i and self._promote(k, now):  # whole prefix so far is pinned on GPU
                    tk.promoted += 1
                    pins[k] = 1
                    gp.on_access(k, now)
                    pinned.append(k)
            prev = k
            i += 1
        if tk.host_hit:
            self._unprotect_host(protected)
        st["gpu_hits"] += tk.gpu_hit
        st["host_hits"] += tk.host_hit
        # 2. the missing blocks, while the chain up to them is pinned on the GPU
        if len(pinned) == i:
            while i < n:
                k = keys[i]
                if k in tier:
                    st["conflicts"] += 1
                    break
                if self.gpu_admission and not gp.admit(k, i, now):
                    st["refused"] += 1
                    if self.capacity[_HOST]:
                        tk.stored_host = self._store_host(keys, i, prev, now)
                    break
                if not self._room_gpu(now):
                    st["no_room"] += 1
                    break
                self._add(k, prev, i, _GPU, now)
                pins[k] = 1
                pinned.append(k)
                tk.inserted += 1
                prev = k
                i += 1
        st["inserted"] += tk.inserted
        self._flush(now)
        return tk

    def _store_host(self, keys: tuple, i: int, prev: Hashable | None, now: float) -> int:
        """Store ``keys[i:]``, which the GPU policy refused, straight on the host (as an
        engine writes blocks through to its offload tier), while the host policy admits
        them and has room; returns how many were stored."""
        tier, hp, hc, st = self._tier, self.policies[_HOST], self._cand[_HOST], self._stats
        stored = 0
        n = len(keys)
        while i < n:
            k = keys[i]
            if k in tier:
                st["conflicts"] += 1
                break
            if not hp.admit(k, i, now):
                break
            guard = prev is not None and tier[prev] == _HOST
            if guard:  # making room must not drop the parent
                self._protected.add(prev)
                if prev in hc:
                    hc.discard(prev)
                    hp.set_candidate(prev, False)
            ok = self._room_host(now)
            if guard:
                self._protected.discard(prev)
            if not ok:
                if guard and self._links.is_leaf(prev):
                    hc.add(prev)
                    hp.set_candidate(prev, True)
                break
            self._add(k, prev, i, _HOST, now)
            hc.add(k)
            hp.set_candidate(k, True)
            stored += 1
            prev = k
            i += 1
        st["stored_host"] += stored
        return stored

    def finish_request(self, ticket: RequestTicket, now: float | None = None) -> None:
        """Unpin a request's blocks in reverse chain order (its tail becomes evictable first)."""
        if ticket.owner is not self:
            raise EvictionError("this ticket was issued by another cache")
        if ticket.finished:
            raise EvictionError("request already finished")
        ticket.finished = True
        now = self._now(now)
        if ticket.epoch != self._epoch:  # its pins went with clear(); the keys may be pinned anew by others
            return
        gp = self.policies[_GPU]
        pins, tier, kids_gpu, gcand = self._pins, self._tier, self._kids_gpu, self._cand[_GPU]
        for k in reversed(ticket.pinned):
            c = pins[k] - 1
            if c:
                pins[k] = c
                continue
            del pins[k]
            if tier.get(k) != _GPU:  # pragma: no cover - pinned blocks never leave the GPU
                raise EvictionError("pinned block left the GPU")
            gp.on_release(k, now)
            if k not in kids_gpu:
                gcand.add(k)
                gp.set_candidate(k, True)
        self._flush(now)

    def access(self, keys: Sequence[Hashable], now: float | None = None,
               info: RequestInfo | None = None) -> RequestTicket:
        """``start_request`` then ``finish_request`` at the same time."""
        now = self._now(now)
        tk = self.start_request(keys, now, info)
        self.finish_request(tk, now)
        return tk

    def hint(self, popularity: dict) -> None:
        """Pass router popularity hints ({key: requests/s}) to both tiers' policies."""
        for p in self.policies:
            p.hint(popularity)

    def clear(self, now: float | None = None) -> None:
        """Drop every block, pinned or not (an engine's prefix-cache reset); pins are forgotten: finishing
        a request started before the clear is then a no-op."""
        now = self._now(now)
        for t in (_GPU, _HOST):
            pol = self.policies[t]
            for k, kt in list(self._tier.items()):
                if kt == t:
                    pol.on_remove(k)
            self._cand[t].clear()
            pol.on_clear()
        self._protected.clear()
        self._links.clear()
        for d in (self._tier, self._depth, self._kids_gpu, self._pins):
            d.clear()
        self._n = [0, 0]
        self._pending.clear()
        self._epoch += 1
        if self.on_event is not None:
            self.on_event(EventBatch(now, (AllBlocksCleared(),)))

    # ---------------------------------------------------------------- internals
    def _add(self, k: Hashable, p: Hashable | None, d: int, t: int, now: float) -> None:
        """Insert a block on tier ``t`` under cached parent ``p`` (no candidacy change for ``k``)."""
        self._tier[k] = t
        self._links.add(k, p)
        self._depth[k] = d
        self._n[t] += 1
        if p is not None:
            self._link(k, p, t)
        self.policies[t].on_insert(k, d, now)
        if self.on_event is not None:
            self._pending.append(("s", t, k, p))

    def _link(self, k: Hashable, p: Hashable, t: int) -> None:
        """``k`` (on tier ``t``) became a child of cached ``p`` (already in the links); update p's candidacy."""
        pt = self._tier[p]
        if pt == _HOST:  # host parent gained a child: no longer a host candidate
            if p in self._cand[_HOST]:
                self._cand[_HOST].discard(p)
                self.policies[_HOST].set_candidate(p, False)
        if t == _GPU:
            kg = self._kids_gpu
            kg[p] = kg.get(p, 0) + 1
            if p in self._cand[_GPU]:
                self._cand[_GPU].discard(p)
                self.policies[_GPU].set_candidate(p, False)

    def _unlink(self, k: Hashable, p: Hashable, t: int) -> None:
        """``k`` (on tier ``t``) left the links and so stopped being a child of ``p``; update p's candidacy."""
        pt = self._tier[p]
        if t == _GPU:
            kg = self._kids_gpu
            c = kg[p] - 1
            if c:
                kg[p] = c
            else:
                del kg[p]
                if pt == _GPU and p not in self._pins:
                    self._cand[_GPU].add(p)
                    self.policies[_GPU].set_candidate(p, True)
        if pt == _HOST and self._links.is_leaf(p) and p not in self._protected:
            self._cand[_HOST].add(p)
            self.policies[_HOST].set_candidate(p, True)

    def _remove(self, k: Hashable) -> None:
        """Drop a block with no cached children from its tier."""
        t = self._tier.pop(k)
        p = self._parent[k]
        self._links.unlink(k)
        del self._depth[k]
        self._n[t] -= 1
        self._cand[t].discard(k)
        self.policies[t].on_remove(k)
        if p is not None:
            self._unlink(k, p, t)
        if self.on_event is not None:
            self._pending.append(("r", t, k, None))

    def _drop_subtree(self, k: Hashable) -> None:
        """Drop ``k`` and all its cached descendants (children first)."""
        stack = [k]
        order = []
        while stack:
            x = stack.pop()
            order.append(x)
            stack.extend(self._links.children(x))
        for x in reversed(order):
            t = self._tier[x]
            self._remove(x)
            self._stats["dropped_gpu" if t == _GPU else "dropped_host"] += 1

    def _room_host(self, now: float) -> bool:
        cap = self.capacity[_HOST]
        hp = self.policies[_HOST]
        while self._n[_HOST] >= cap:
            v = hp.victim()
            if v is None or v not in self._cand[_HOST]:
                if v is not None:
                    raise EvictionError(f"host policy {hp.name} picked a non-candidate {v!r}")
                return False
            self._remove(v)
            self._stats["dropped_host"] += 1
        return True

    def _room_gpu(self, now: float) -> bool:
        cap = self.capacity[_GPU]
        gp = self.policies[_GPU]
        while self._n[_GPU] >= cap:
            v = gp.victim()
            if v is None:
                return False
            if v not in self._cand[_GPU]:
                raise EvictionError(f"GPU policy {gp.name} picked a non-candidate {v!r}")
            self._evict_gpu(v, now)
        return True

    def _evict_gpu(self, v: Hashable, now: float) -> None:
        hp = self.policies[_HOST]
        if self.capacity[_HOST] and hp.admit(v, self._depth[v], now) and self._room_host(now):
            # demote: leave the GPU, join the host; children (all on host) stay linked.  Making room may
            # have dropped some of v's host children (host leaves like any other).
            p = self._parent[v]
            d = self._depth[v]
            self._n[_GPU] -= 1
            self._cand[_GPU].discard(v)
            self.policies[_GPU].on_remove(v)
            if self.on_event is not None:
                self._pending.append(("s", _HOST, v, p))
                self._pending.append(("r", _GPU, v, None))
            self._tier[v] = _HOST
            self._n[_HOST] += 1
            if p is not None:  # v no longer a GPU child of p
                kg = self._kids_gpu
                c = kg[p] - 1
                if c:
                    kg[p] = c
                else:
                    del kg[p]
                    if p not in self._pins:
                        self._cand[_GPU].add(p)
                        self.policies[_GPU].set_candidate(p, True)
            hp.on_insert(v, d, now)
            if self._links.is_leaf(v):
                self._cand[_HOST].add(v)
                hp.set_candidate(v, True)
            self._stats["demoted"] += 1
        else:
            self._drop_subtree(v)

    def _protect_host(self, keys: tuple, i: int) -> list:
        """Take the host part of a request's prefix (from ``keys[i]``) out of the host candidates,
        so that demotions made while promoting it cannot drop it; returns the keys."""
        tier, parent, hc, hp = self._tier, self._parent, self._cand[_HOST], self.policies[_HOST]
        out = []
        prev = keys[i - 1] if i else None
        for k in keys[i:]:
            if tier.get(k) != _HOST or parent[k] != prev:
                break
            out.append(k)
            self._protected.add(k)
            if k in hc:
                hc.discard(k)
                hp.set_candidate(k, False)
            prev = k
        return out

    def _unprotect_host(self, keys: list) -> None:
        tier, is_leaf, hc, hp = self._tier, self._links.is_leaf, self._cand[_HOST], self.policies[_HOST]
        self._protected.clear()
        for k in keys:
            if tier.get(k) == _HOST and is_leaf(k) and k not in hc:
                hc.add(k)
                hp.set_candidate(k, True)

    def _promote(self, k: Hashable, now: float) -> bool:
        """Move host block ``k`` (parent pinned on the GPU, k protected) to the GPU;
        False if the GPU is full of pins."""
        hp = self.policies[_HOST]
        if not self._room_gpu(now):
            return False
        p = self._parent[k]
        d = self._depth[k]
        self._n[_HOST] -= 1
        hp.on_remove(k)
        if self.on_event is not None:
            self._pending.append(("s", _GPU, k, p))
            self._pending.append(("r", _HOST, k, None))
        self._tier[k] = _GPU
        self._n[_GPU] += 1
        if p is not None:
            kg = self._kids_gpu
            kg[p] = kg.get(p, 0) + 1  # p is pinned on the GPU: no candidacy change
        self.policies[_GPU].on_insert(k, d, now)
        self._stats["promoted"] += 1
        return True

    def _flush(self, now: float) -> None:
        if self.on_event is None or not self._pending:
            return
        events: list = []
        run_kind = run_tier = None
        run: list = []
        run_parent = None
        for kind, t, k, p in self._pending:
            if kind == run_kind and t == run_tier and (kind == "r" or p == run[-1]):
                run.append(k)
                continue
            if run:
                events.append(_event(run_kind, run_tier, run, run_parent))
            run_kind, run_tier, run, run_parent = kind, t, [k], p
        if run:
            events.append(_event(run_kind, run_tier, run, run_parent))
        self._pending.clear()
        self.on_event(EventBatch(now, tuple(events)))

    # --------------------------------------------------------------- checking
    def check_invariants(self) -> None:
        """Raise AssertionError if a structural rule (module docstring) is broken."""
        self._links.check_invariants()
        tier, parent, kg, pins = self._tier, self._parent, self._kids_gpu, self._pins
        kids = {p: set(self._links.children(p)) for p in tier if not self._links.is_leaf(p)}
        assert set(tier) == set(parent) == set(self._depth)
        n = [0, 0]
        want_kids: dict = {}
        want_kg: dict = {}
        for k, t in tier.items():
            n[t] += 1
            p = parent[k]
            if p is not None:
                assert p in tier, f"block {k!r} cached without its parent {p!r}"
                if t == _GPU:
                    assert tier[p] == _GPU, f"GPU block {k!r} under host parent {p!r}"
                    want_kg[p] = want_kg.get(p, 0) + 1
                want_kids.setdefault(p, set()).add(k)
                assert self._depth[k] == self._depth[p] + 1
            else:
                assert self._depth[k] == 0
        assert n == self._n, (n, self._n)
        assert n[0] <= self.capacity[0] and n[1] <= self.capacity[1], (n, self.capacity)
        assert want_kids == kids
        assert want_kg == kg
        for k, c in pins.items():
            assert c > 0 and tier.get(k) == _GPU, f"pinned block {k!r} not on the GPU"
        gc = {k for k, t in tier.items() if t == _GPU and k not in pins and k not in kg}
        hc = {k for k, t in tier.items() if t == _HOST and k not in kids}
        assert gc == self._cand[_GPU], "GPU candidates out of sync"
        assert hc == self._cand[_HOST], "host candidates out of sync"
        for t, pol in enumerate(self.policies):
            cnt = getattr(pol, "candidates", None)
            if cnt is not None:
                assert cnt() == len(self._cand[t]), (pol.name, cnt(), len(self._cand[t]))


def _event(kind: str, t: int, keys: list, parent: Any) -> Any:
    tier = Tier.GPU if t == _GPU else Tier.HOST
    if kind == "s":
        return BlockStored(tuple(keys), parent, (), 0, tier)
    return BlockRemoved(tuple(keys), tier)


def index_follower(index: Any, worker: Any) -> Callable[[EventBatch], None]:
    """An ``on_event`` callback that keeps ``index`` (a KVIndex) in step with a cache as ``worker``.

    The cache's keys are content hashes, so stored blocks go in through
    :meth:`KVIndex.store` (placeholder events carry no tokens) and removals
    through :meth:`KVIndex.remove`.
    """
    index.add_worker(worker)

    def follow(batch: EventBatch) -> None:
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                index.store(worker, ev.block_hashes, parent=ev.parent_block_hash, tier=ev.tier)
            elif isinstance(ev, BlockRemoved):
                index.remove(worker, ev.block_hashes, tier=ev.tier)
            elif isinstance(ev, AllBlocksCleared):
                index.clear(worker)

    return follow
