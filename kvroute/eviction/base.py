"""The one eviction-policy interface, its errors and a heap helper for policies.

A policy never sees the cache structure.  The cache (:class:`kvroute.eviction.TieredCache`,
or an engine adapter such as the vLLM one) keeps blocks, prefix relations and
pins; it tells the policy what happens to blocks and asks it for a victim among
the blocks that may be evicted *now* (its *candidates*: unpinned leaves).  One
policy instance serves one tier of one cache.

Calls the cache makes (``bind(capacity)`` once, first), in the order they happen for one request::

    request_info(info)               optional, before begin: what is known of the request besides its
                                     keys (a RequestInfo: output length, client hints)
    begin(keys, now)                 a request arrives with these block keys (chain order)
    admit(key, depth, now) -> bool   may a missing block be cached? (admission)
    on_insert(key, depth, now)       a block entered this tier (not a candidate until
                                     set_candidate(key, True): a GPU insert is pinned, a host
                                     insert is offered at once when it has no cached child)
    on_access(key, now)              a cached block was hit (it is pinned first)
    on_release(key, now)             the request is done with a block; called in
                                     reverse chain order, so a prompt's tail is
                                     released first (vLLM's free-queue order)
    set_candidate(key, flag)         the block may (True) / may no longer (False) be evicted
    victim() -> key | None           pick one candidate; the cache then removes it
    on_remove(key)                   a block left this tier (evicted, demoted, promoted)
    on_clear()                       every block left at once (a prefix-cache reset), after
                                     on_remove(key) for each
    extend(keys, start, now)         engines only: keys[start:] joined the request's chain
                                     (its response's blocks)
    hint(popularity)                 optional: {key: requests per second} from a router's
                                     cluster-wide view (plain data, no router import)

Keys are plain ints (chained content hashes), ``depth`` the block's 0-based
position in its chain, ``now`` seconds on any monotonic clock.

Driving a policy from an engine (e.g. vLLM's GPU free-block queue or its CPU
offload ``CachePolicy``): call ``begin`` when a request is scheduled with its
block hashes, ``on_insert`` when a block is cached, ``on_access`` on a prefix
hit, ``on_release`` + ``set_candidate(key, True)`` when its ref count drops to
zero (in the order the engine frees them), ``set_candidate(key, False)`` when
it is touched again, and ``victim()`` + ``on_remove`` when the engine needs a
block.  An engine that may evict inner blocks simply offers every free block as
a candidate; kvroute's own cache offers leaves only.  ``admit`` returning False
means "free this block first" for an engine that must compute it anyway.

:class:`HeapPolicy` implements ``set_candidate``/``victim``/``on_remove`` over a
lazily-invalidated heap: a subclass only defines ``priority(key)`` (lowest is
evicted first), evaluated when a block becomes a candidate.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

from ..kvindex.errors import KVRouteError


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a cache may know of a request besides its block keys: plain data, from the engine or passed
    from the router (no router import).  Every field is optional (None: unknown); created by whoever
    drives the cache (a replay, ``kvroute sim``, an engine adapter), read by policies only.

    Client hints are what Dynamo's per-request cache-control TTL and SGLang's priority / retention
    hints carry: the agent harness knows its session and roughly when it will call again.
    """

    #: Tokens the request generates (an engine knows it when the request finishes; a replay, at once).
    output_tokens: int | None = None
    #: Client hint: the session (conversation, agent run) the request belongs to.
    session: Hashable | None = None
    #: Client hint: seconds from this request's arrival until the session's next request is expected
    #: (after the tool call or think time); the cache keeps the prompt for it if it is worth it.
    #: ``math.inf``: the session is done (nothing will reuse its prompt).
    expected_return_s: float | None = None


class EvictionError(KVRouteError):
    """Base of the eviction package's errors."""


class UnknownPolicyError(EvictionError, KeyError):
    """A policy name that is not in :data:`kvroute.eviction.POLICIES`."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown policy"


class PolicyUnavailableError(EvictionError):
    """A registered policy whose optional dependency (e.g. libcachesim) is missing,
    or an oracle built without what it needs (Belady without the future)."""


class EvictionPolicy:
    """Base class: every hook is a no-op except :meth:`victim`, :meth:`set_candidate`.

    Subclasses document their state where they declare it; only the owning cache
    calls the hooks (one instance per tier per cache).
    """

    #: Registry name of the policy.
    name = "base"

    def bind(self, capacity: int) -> None:
        """The cache tells the policy its tier's capacity in blocks (once, before any other call)."""

    def request_info(self, info: RequestInfo) -> None:
        """What is known of the request whose :meth:`begin` comes next (ignored by default)."""

    def begin(self, keys: Sequence[Hashable], now: float) -> None:
        """A request arrives; ``keys`` are all its blocks in chain order."""

    def extend(self, keys: Sequence[Hashable], start: int, now: float) -> None:
        """``keys[start:]`` joined the chain of the request whose ``keys[:start]`` :meth:`begin` saw (an
        engine's response blocks, hashed as they are generated); ignored by default."""

    def admit(self, key: Hashable, depth: int, now: float) -> bool:
        """Whether a missing block may be cached in this tier (default: always)."""
        return True

    def on_insert(self, key: Hashable, depth: int, now: float) -> None:
        """``key`` entered this tier at chain position ``depth``."""

    def on_access(self, key: Hashable, now: float) -> None:
        """``key`` was hit in this tier."""

    def on_release(self, key: Hashable, now: float) -> None:
        """A request released ``key`` (reverse chain order within one request)."""

    def set_candidate(self, key: Hashable, flag: bool) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def victim(self) -> Hashable | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_remove(self, key: Hashable) -> None:
        """``key`` left this tier (the cache calls it after :meth:`victim` picked it, too)."""

    def on_clear(self) -> None:
        """The cache dropped every block at once (an engine's prefix-cache reset), after calling
        :meth:`on_remove` for each; what was learned about the workload may stay."""

    def hint(self, popularity: Mapping[Hashable, float]) -> None:
        """Popularity hints (requests/s per block) from a cluster-wide view; ignored by default."""

    def describe(self) -> dict[str, Any]:
        """Parameters and learned state worth reporting (JSON-able)."""
        return {"name": self.name}


class HeapPolicy(EvictionPolicy):
    """Candidates in a min-heap of ``(priority, seq, key)`` with lazy invalidation."""

    def __init__(self) -> None:
        #: Heap of (priority, seq, key); entries whose seq != _cand[key] are stale.
        self._heap: list[tuple[Any, int, Hashable]] = []
        #: key -> seq of its live heap entry, for every current candidate.
        self._cand: dict[Hashable, int] = {}
        #: Monotonic counter: tie-break (older first) and entry identity.
        self._seq = 0

    def priority(self, key: Hashable) -> Any:  # pragma: no cover - abstract
        """Sort key of a candidate; the smallest is evicted first."""
        raise NotImplementedError

    def set_candidate(self, key: Hashable, flag: bool) -> None:
        if flag:
            self._seq += 1
            self._cand[key] = self._seq
            heapq.heappush(self._heap, (self.priority(key), self._seq, key))
            if len(self._heap) > 4 * len(self._cand) + 1024:
                self._compact()
        else:
            self._cand.pop(key, None)

    def _compact(self) -> None:
        cand = self._cand
        self._heap = [e for e in self._heap if cand.get(e[2]) == e[1]]
        heapq.heapify(self._heap)

    def victim(self) -> Hashable | None:
        heap, cand = self._heap, self._cand
        while heap:
            _, seq, key = heap[0]
            if cand.get(key) == seq:
                return key
            heapq.heappop(heap)
        return None

    def on_remove(self, key: Hashable) -> None:
        self._cand.pop(key, None)

    def candidates(self) -> int:
        """Number of current candidates (for tests)."""
        return len(self._cand)
