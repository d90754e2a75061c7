"""libcachesim's policies (S3-FIFO, SIEVE, W-TinyLFU, ARC, LRU...) as kvroute policies.

libcachesim (Yang et al.; Python package ``libcachesim``) simulates caches of
independent objects.  The wrapper drives one of its caches block by block: when
a request arrives, every block of its prompt is requested from the libcachesim
cache, tail first and head last (the order vLLM releases them in, so that the
head, which every continuation reuses, is the most recent) (``get``: hit, or insert and evict inside libcachesim).
The kvroute cache then follows libcachesim's verdicts under prefix semantics:

* admission: a missing block is cached only if libcachesim now holds it
  (admission filters such as W-TinyLFU's show up here);
* eviction: the victim is the least recently released candidate (unpinned leaf)
  that libcachesim no longer holds, looking at the ``scan`` oldest candidates;
  if all of them are still held, the oldest candidate goes.

So hits are counted as kvroute counts them (longest cached prefix), and holes
that an object cache would leave in a prefix are never counted as hits.
S3-FIFO: Yang et al., SOSP'23; SIEVE: Zhang et al., NSDI'24; W-TinyLFU:
Einziger, Friedman, Manes, ACM ToS 2017.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Hashable, Sequence

from ..base import EvictionPolicy, PolicyUnavailableError

_MASK = (1 << 64) - 1

#: Smallest capacity (blocks) each libcachesim algorithm accepts without aborting the process.
MIN_CAPACITY = {"S3FIFO": 20, "WTinyLFU": 100}


class LibCacheSimPolicy(EvictionPolicy):
    """Follow a libcachesim cache of the same capacity, with prefix semantics."""

    def __init__(self, algorithm: str = "S3FIFO", label: str | None = None, scan: int = 64, **params) -> None:
        try:
            import libcachesim
        except ImportError as e:  # pragma: no cover - registry lists these only when installed
            raise PolicyUnavailableError("libcachesim is not installed (pip install libcachesim)") from e
        self._lcs = libcachesim
        #: libcachesim class name (fixed).
        self.algorithm = algorithm
        #: Registry name.
        self.name = label or f"lcs_{algorithm.lower()}"
        #: How many oldest candidates to look through for one libcachesim evicted.
        self.scan = scan
        #: Extra constructor parameters for the libcachesim cache.
        self.params = params
        #: The libcachesim cache (built by bind()).
        self._cache = None
        #: Reused request object.
        self._req = libcachesim.Request()
        self._req.obj_size = 1
        #: Candidates, least recently released first.
        self._cand: OrderedDict = OrderedDict()

    def bind(self, capacity: int) -> None:
        need = MIN_CAPACITY.get(self.algorithm, 1)
        if capacity < need:
            raise PolicyUnavailableError(f"libcachesim {self.algorithm} needs at least {need} blocks, got {capacity}")
        self._cache = getattr(self._lcs, self.algorithm)(cache_size=capacity, **self.params)

    def _ensure(self) -> None:
        if self._cache is None:
            raise PolicyUnavailableError(f"{self.name}: bind(capacity) was not called")

    def begin(self, keys: Sequence[Hashable], now: float) -> None:
        self._ensure()
        req, get = self._req, self._cache.get
        req.clock_time = int(now)
        for k in reversed(keys):  # tail first, head last: vLLM's release order
            req.obj_id = hash(k) & _MASK
            get(req)

    def _held(self, key: Hashable) -> bool:
        self._req.obj_id = hash(key) & _MASK
        return self._cache.find(self._req, False) is not None

    def admit(self, key: Hashable, depth: int, now: float) -> bool:
        self._ensure()
        return self._held(key)

    def set_candidate(self, key: Hashable, flag: bool) -> None:
        if flag:
            self._cand[key] = None
            self._cand.move_to_end(key)
        else:
            self._cand.pop(key, None)

    def victim(self) -> Hashable | None:
        if not self._cand:
            return None
        for k in itertools.islice(self._cand, self.scan):
            if not self._held(k):
                return k
        return next(iter(self._cand))

    def on_remove(self, key: Hashable) -> None:
        self._cand.pop(key, None)

    def candidates(self) -> int:
        return len(self._cand)

    def describe(self) -> dict:
        return {"name": self.name, "algorithm": self.algorithm, "scan": self.scan}


def presence_replay(reqs: Sequence, capacity: int, algorithm: str, **params) -> dict:
    """The libcachesim cache alone, counted with prefix semantics.

    Every block of every request is requested from the libcachesim cache (tail
    first, as above); a request's hit is the longest prefix of its blocks that
    the cache held *before* the request.  Returns ``present`` (blocks held,
    holes included) and ``prefix`` (usable: the longest held prefix) hit
    ratios, both over all blocks.
    """
    try:
        import libcachesim
    except ImportError as e:  # pragma: no cover
        raise PolicyUnavailableError("libcachesim is not installed (pip install libcachesim)") from e
    need = MIN_CAPACITY.get(algorithm, 1)
    if capacity < need:
        raise PolicyUnavailableError(f"libcachesim {algorithm} needs at least {need} blocks, got {capacity}")
    cache = getattr(libcachesim, algorithm)(cache_size=capacity, **params)
    req = libcachesim.Request()
    req.obj_size = 1
    find, get = cache.find, cache.get
    total = present = prefix = 0
    for r in reqs:
        keys = r.keys
        req.clock_time = int(r.ts)
        run = True
        for k in keys:
            req.obj_id = hash(k) & _MASK
            if find(req, False) is not None:
                present += 1
                if run:
                    prefix += 1
            else:
                run = False
        for k in reversed(keys):
            req.obj_id = hash(k) & _MASK
            get(req)
        total += len(keys)
    total = max(1, total)
    return {"present": present / total, "prefix": prefix / total}
