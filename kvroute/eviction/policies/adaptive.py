"""``adaptive``: workload-aware prefix eviction by learned hit density (the flagship).

Design notes
------------
The gap between LRU and the offline optimum on chat traces is in *which new
blocks will ever be reused*: most blocks are seen once, and whether a
conversation continues depends on how far it has gone (on the bundled Mooncake
conversation trace, 24-31% of first turns get a next turn, 40% of second turns,
55% of fourth, 65-75% from the sixth on; median gap about two minutes).  So the
policy learns, online and from the workload alone:

* **Classes.**  Each access puts a block in a class: the *turn depth* of the
  request (1 + the depth of the request whose prompt this one extends, found
  from the previous prompts' last blocks; a block with more than two distinct
  successors is a shared prefix such as a system prompt, which starts no
  conversation), the size of the prompt's *new part* (blocks after its longest
  previously seen prefix: second turns that add a few blocks continue about
  half the time, those that paste eight or more almost never), whether the
  block is the prompt's *tail* (the last block, which a next turn does not
  reuse when it is partial), how often the block was used (once, 2-3 times, 4 or more:
  prefix popularity, as ARC's second list) and whether it is *shared*
  (branching).  Like the per-category reuse prediction of "KVCache in the
  wild" (Wang et al., ATC'25).
* **Reuse-time survival.**  For every class, the lifetimes of its blocks (from
  an access to the next) per log-spaced age bin, from a ghost table of recently
  seen blocks (bounded, several times the capacity), so learning does not
  depend on what the cache kept: those that ended in a reuse, and those
  *censored* (still open, or dropped from the ghost unreused).  The reuse
  hazard per bin is the Kaplan-Meier estimate (reuses / lifetimes that reached
  the bin; Kaplan & Meier, JASA 1958), so young data does not read as "never
  reused" while reuses at long ages are still to come.  Each class's hazards
  are shrunk toward its group's (same tail flag and use count) and a group's
  toward all classes' with ``shrink`` pseudo-lifetimes (empirical Bayes, as in
  hierarchical smoothing of sparse contexts), so sparse classes follow their
  group.  Counts are halved periodically to follow drift.
* **Hit density** (LHD: Beckmann, Chen, Cidon, NSDI'18): the value of a block of
  class ``c`` at age ``a`` (time since its last access) is the expected hits
  per block-second of cache it will use, over the cache's characteristic time
  ``T`` (capacity / insertion rate, Little's law; Che et al. 2002):
  ``HD(c, a) = P(a < X <= a + T) / E[min(X, a + T) - a]``, ``X`` the reuse time,
  conditioned on ``X > a``.  It rises with the continuation probability and
  falls with the expected wait, so it weighs frequency (classes of shared,
  often-reused blocks) against recency (age) with weights learned from the
  trace instead of a fixed LRU/LFU mix; as ``T`` and the histograms move, the
  balance moves with them.
* **Eviction.**  Candidates (unpinned leaves) sit in one heap per class, oldest
  first; the victim is the class head with the lowest hit density (within a
  class the density falls with age for the heavy-tailed gaps seen here).
  Densities within a factor ``2 ** density_quantum`` count as equal and the
  older block goes: where the learned estimates cannot tell blocks apart, the
  policy is LRU, so noise in the estimates does not cost hits.
  Evicting leaves only is what makes it prefix-aware: a block's accesses count
  every request whose prefix runs through it, and an inner block is never
  dropped before its descendants.
* **Admission.**  A missing block whose class density at age 0 is below that of
  recent victims is not cached (it would be the next victim anyway), and with
  it the rest of its prompt; the tail of a first turn is the typical case.
  (An engine's GPU pool must still hold such a block while its request runs;
  the vLLM GPU plugin therefore leaves admission off by default.)
* **Recompute cost.**  ``Weights.depth_cost`` scales a block's density by
  ``1 + depth_cost * depth`` (attention makes deeper blocks dearer to
  recompute); 0 by default, because the figures count blocks.
* **Router hints.**  :meth:`hint` takes ``{key: requests per second}``; a hinted
  block's density is at least its hinted rate (hits per block-second).
* **Chain rhythm and client hints (issue 16).**  The time since the request a
  prompt extends (``gap_edges``) is part of the request class; the output length
  (``out_edges``) may be.  A request's :class:`~kvroute.eviction.base.RequestInfo`
  may carry a client's expected return time: such blocks wait in their own heap,
  furthest return first, worth one hit per second of waiting (Belady's rule on
  what the client says, as Dynamo's cache-control TTL and SGLang's retention hints
  are meant to be used); overdue ones fall back to their class.
* **Two tiers, default: one learned cache of their summed size.**  The host tier
  reads the GPU tier's learned state (``follow``), both value blocks over the
  whole cache's characteristic time, the GPU tier demotes its lowest-density
  leaf, and the host takes a demoted block only when it outranks its own victim
  (:meth:`Adaptive._union_admit`): of the two, the lower leaves the cache, as in
  one cache of the summed size.  No shadow cache, one learning pass.
* **Two tiers with ``duel=True``: one cache of their summed size, run by the leading expert.**
  GPU + host keep a block as long as either holds it, so their total hits are
  those of one cache of the summed size.  The host tier's instance
  (``tier_role = "host"``, set by :class:`TieredCache`) runs three *shadow
  caches* of GPU + host blocks (learned without duel, LRU, ARC;
  :class:`~kvroute.eviction.shadow.ShadowCache`) that serve every request on
  their own, and scores each by its hits with slow forgetting (``duel_decay``
  per request).  Both tiers follow the leader's shadow *contents*
  (:class:`~kvroute.eviction.shadow.Votes`): they demote / drop first what that
  shadow has dropped (among those, what the others dropped too), and admit
  what it holds; with the leader fixed, GPU + host hit as often as its shadow.
  Only among blocks every shadow holds does the leader's own ordering pick
  (the learned density, or an LRU / ARC instance fed every hook).  The leader
  starts as the learned expert and changes only when another shadow beats it
  by ``duel_margin`` (5%) *and* significantly: its hit surplus over the leader,
  summed request by request since the last switch, exceeds ``duel_z`` (2) times
  the root of the summed squared differences.  A switch costs about a cache
  turnover of hits, and on the bundled traces every switch the margin alone
  allowed followed a lead that did not last, and cost hits.
  This is set dueling (Qureshi et al., "Adaptive Insertion Policies for High
  Performance Caching", ISCA'07) with full shadow caches in place of leader
  sets (ghost caches as in ARC, Megiddo & Modha FAST'03; experts chosen by
  their shadows' hits as in ACME, Ari et al., 2002, and LeCaR, Vietri et al.,
  HotStorage'18).  A GPU-only cache (and an engine's tier, which sets no role)
  runs no duel.

Speed (issue 16): the victim is the lowest-ranked class head; the heads' ranks at
the current time sit in a small heap that lives as long as the clock and the
density tables do (:meth:`Adaptive._learned_victim`; a scan of every class head
per eviction, kept as :meth:`Adaptive._victim_by_scan`, is the reference the
tests compare it with), and the density tables of all classes are recomputed
at once with numpy, with the scalar reference's arithmetic (:func:`_density_table`).

Only plain data crosses in: no router import.
"""
from __future__ import annotations

import bisect
import functools
import heapq
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np

from ...kvindex import backend as _backend
from ..base import EvictionError, EvictionPolicy
from .arc import ARC
from .lru import LRU
from ..shadow import ShadowCache, Votes

#: Experts of the duel: 0 the learned density (this module), 1 LRU (vLLM order), 2 ARC.
EXPERTS = ("learned", "lru", "arc")


@dataclass(frozen=True)
class Weights:
    """Parameters of :class:`Adaptive` (one set of defaults for every workload)."""

    #: Ghost table size as a multiple of the capacity (blocks remembered after eviction).
    ghost_factor: float = 16.0
    #: Ghost size floor, for tiny caches.
    ghost_min: int = 4096
    #: Halve all learned counts after this many block accesses.
    half_life_accesses: int = 100_000
    #: Recompute the density tables every this many requests.
    refresh_requests: int = 64
    #: Admit a block only if its density at age 0 is at least this share of recent victims'.
    admit_ratio: float = 1.0
    #: Smoothing weight of victim densities (admission threshold), per eviction.
    victim_ewma: float = 0.01
    #: Density multiplier per block of depth (recompute cost); 0: every block counts the same.
    depth_cost: float = 0.0
    #: Horizon of the density as a multiple of the characteristic time T.
    horizon_factor: float = 1.0
    #: Deepest turn depth with its own class (deeper turns share the last one).
    max_turn_class: int = 6
    #: Size classes of a prompt's new part (blocks after its longest previously seen prefix).
    new_block_edges: tuple = (4, 8)
    #: Gap classes: edges (seconds) of the time since the request a prompt extends (its chain's previous
    #: request; an agent's tool call or think time, a chat user's reading time); () : no gap classes.
    gap_edges: tuple = (16, 64, 256)
    #: Output-length classes: edges (tokens) of RequestInfo.output_tokens (an agent's long answer is often
    #: followed by a long tool run); () : none.
    out_edges: tuple = ()
    #: Use-count classes (accesses seen, ghost included): edges of the buckets (once, 2-3, 4 or more).
    freq_edges: tuple = (2, 4)
    #: Densities within a factor ``2 ** density_quantum`` tie, and the older block goes (0: exact).
    density_quantum: float = 0.5
    #: Shrinkage: pseudo-lifetimes with which a class's reuse hazard per age bin is pulled toward its
    #: group's (and a group's toward all classes'); sparse classes follow their group, rich ones their data.
    shrink: float = 20.0
    #: Pseudo-counts (reuses at the first age bin) each class starts with: LRU-like until data comes.
    prior_hits: float = 1.0
    prior_lifetimes: float = 4.0
    #: Duel the learned policy against LRU and ARC on shadow caches and follow the best (False: learned only).
    duel: bool = False
    #: Duel: per request, every expert's shadow hit count is multiplied by this (forgetting).
    duel_decay: float = 0.99995
    #: Duel: the leader changes only when another expert's shadow hits exceed the leader's by this share
    #: (the learned expert leads first).  A switch costs about a cache turnover of hits (the new leader's
    #: blocks must be fetched again), so only a clear, lasting lead is worth one.
    duel_margin: float = 0.05
    #: Duel: ... and only when that lead is significant: the expert's surplus of hits over the leader,
    #: summed request by request since the last switch (weighted by ``duel_decay`` per request), exceeds
    #: ``duel_z`` times the root of the summed squared weighted per-request differences (a one-sided
    #: test on the paired differences, their mean taken as 0 under the null; 0: the margin alone decides).
    duel_z: float = 2.0

    def __post_init__(self) -> None:
        bad = [f"{n}={getattr(self, n)!r}" for n in (
            "ghost_factor", "admit_ratio", "depth_cost", "horizon_factor", "density_quantum", "shrink",
            "prior_hits", "duel_margin", "duel_z") if not getattr(self, n) >= 0]
        bad += [f"{n}={getattr(self, n)!r}" for n in ("ghost_min", "half_life_accesses", "refresh_requests",
                                                       "max_turn_class") if not getattr(self, n) >= 1]
        if not 0 < self.victim_ewma <= 1:
            bad.append(f"victim_ewma={self.victim_ewma!r}")
        if not 0 < self.duel_decay <= 1:
            bad.append(f"duel_decay={self.duel_decay!r}")
        o = tuple(self.out_edges)
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in o) or list(o) != sorted(set(o)):
            bad.append(f"out_edges={o!r} (positive ints, increasing)")
        g = tuple(self.gap_edges)
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 for x in g) or list(g) != sorted(set(g)):
            bad.append(f"gap_edges={g!r} (positive seconds, increasing)")
        for n in ("new_block_edges", "freq_edges"):
            e = tuple(getattr(self, n))
            if any(not isinstance(x, int) or x < 1 for x in e) or list(e) != sorted(set(e)):
                bad.append(f"{n}={e!r} (positive ints, increasing)")
        if not self.prior_lifetimes >= self.prior_hits:
            bad.append(f"prior_lifetimes={self.prior_lifetimes!r} < prior_hits")
        if bad:
            raise EvictionError("adaptive: invalid weights: " + ", ".join(bad))


# Age bins: [0, 0.25 s), then doubling by sqrt(2) up to about 9 hours.
_EDGES = [0.0] + [0.25 * 2 ** (i / 2) for i in range(0, 34)]
_MIDS = [(_EDGES[i] + _EDGES[i + 1]) / 2 for i in range(len(_EDGES) - 1)] + [_EDGES[-1] * 1.5]
_NBINS = len(_MIDS)


def _bin(age: float) -> int:
    """Age bin of ``age`` seconds; a negative age (a clock that went backwards, or a lifetime opened
    in the current time slot before its midpoint) is age 0."""
    if age <= 0.0:
        return 0
    return bisect.bisect_right(_EDGES, age) - 1 if age < _EDGES[-1] else _NBINS - 1


#: Width in seconds of the time slots in which open lifetimes are counted by start time.
_SLOT = 4.0


def _at_risk(hits: list, gone: list, open_: dict, now: float) -> list:
    """Lifetimes of one class that reached each age bin (Kaplan-Meier's risk set).

    ``hits[j]``: lifetimes that ended in a reuse at age bin ``j``; ``gone[j]``: lifetimes censored at
    bin ``j`` (they left the ghost unreused); ``open_``: open lifetimes per start slot, censored at
    their current age (one still in bin ``j`` counts half there).  Dividing reuses by this risk set
    instead of by all accesses keeps young data from reading as "never reused" while reuses at long
    ages are still to come.
    """
    ob = [0.0] * _NBINS
    for s, n in open_.items():
        ob[_bin(now - (s + 0.5) * _SLOT)] += n
    risk = [0.0] * _NBINS
    acc = 0.0
    for j in range(_NBINS - 1, -1, -1):
        risk[j] = acc + hits[j] + gone[j] + 0.5 * ob[j]
        acc += hits[j] + gone[j] + ob[j]
    return risk


def _shrunk(hits: list, risk: list, prior: list, k: float) -> list:
    """Hazard per bin, ``hits / risk``, pulled toward ``prior`` with ``k`` pseudo-lifetimes (empirical
    Bayes): a bin with little data follows the prior, one with much data its own counts."""
    return [(hits[j] + k * prior[j]) / (risk[j] + k) if risk[j] + k > 0 else prior[j] for j in range(_NBINS)]


def _density(lam: list, T: float) -> list:
    """Hit density per age bin from hazards ``lam`` over the horizon ``T`` (LHD).

    From age ``a`` (bin ``i``), with ``S`` the survival since ``a``, the reuses expected within the
    horizon are ``sum S_j * lam_j`` over bins up to ``a + T``; the space they use is
    ``sum S_j * lam_j * (mid_j - a)`` plus ``T`` for every lifetime still unreused at the horizon; the
    density is their ratio.
    """
    hd = [0.0] * _NBINS
    for i in range(_NBINS):
        a = _EDGES[i] if i < len(_EDGES) else _MIDS[-1]
        lim = a + T
        surv = 1.0
        got = space = 0.0
        for j in range(i, _NBINS):
            mj = _MIDS[j]
            if mj > lim:
                break
            pj = surv * lam[j]
            got += pj
            space += pj * max(mj - a, 0.125)
            surv -= pj
        space += max(1.0 - got, 0.0) * T
        hd[i] = got / space if space > 0 else 0.0
    return hd


_EDGES_NP = np.array(_EDGES)
_A0 = [_EDGES[i] if i < len(_EDGES) else _MIDS[-1] for i in range(_NBINS)]

#: The compiled core's twins of the hot paths (``DensityHeaps``: the class heaps and the victim
#: snapshot; ``density_table``), or None: the pure-Python reference (``KVROUTE_PURE_PYTHON=1``, or a
#: core built without them).  Read by :meth:`Adaptive.bind`; tests set it to compare the two exactly.
_NATIVE = _backend.core if _backend.core is not None and hasattr(_backend.core, "DensityHeaps") else None


def _density_table(lam: np.ndarray, T: float) -> np.ndarray:
    """:func:`_density` for every row of ``lam`` (classes x bins) at once, with the same arithmetic in
    the same order per row (so the tables equal the scalar reference's exactly; tested).  The refresh's
    hot spot: 109 classes x 35 x 35 bins in Python took 12 ms a refresh."""
    C = lam.shape[0]
    hd = np.zeros((C, _NBINS))
    cols = [lam[:, j] for j in range(_NBINS)]
    for i in range(_NBINS):
        a = _A0[i]
        lim = a + T
        surv = np.ones(C)
        got = np.zeros(C)
        space = np.zeros(C)
        for j in range(i, _NBINS):
            mj = _MIDS[j]
            if mj > lim:
                break
            pj = surv * cols[j]
            got += pj
            space += pj * max(mj - a, 0.125)
            surv -= pj
        space += np.maximum(1.0 - got, 0.0) * T
        out = hd[:, i]
        np.divide(got, space, out=out, where=space > 0)
    return hd


class Adaptive(EvictionPolicy):
    """Learned per-class hit density; leaves-first eviction and admission."""

    name = "adaptive"

    def __init__(self, weights: Weights | None = None, **overrides) -> None:
        w = weights or Weights()
        if overrides:
            w = Weights(**{**asdict(w), **overrides})
        #: Parameters (fixed).
        self.w = w
        nt = w.max_turn_class
        #: Gap classes (time since the request a prompt extends), per new-part size class.
        self._ng = len(w.gap_edges) + 1
        #: Output-length classes per gap class.
        self._no = len(w.out_edges) + 1
        nb = (len(w.new_block_edges) + 1) * self._ng * self._no
        nf = len(w.freq_edges) + 1
        self._nf = nf
        #: Use-count bucket per use count (the last entry serves every larger count).
        self._fbucket = [bisect.bisect_right(w.freq_edges, f) if nf > 1 else 0 for f in range(max(w.freq_edges or (1,)) + 2)]
        #: Number of classes: turn depth (1..nt) x new-part size (nb) x tail (2) x uses (nf) + shared (1).
        self.nclasses = nt * nb * 2 * nf + 1
        self._nb = nb
        self._shared_cls = self.nclasses - 1
        #: Shrinkage groups (fixed): the classes with the same tail flag and use-count bucket (any turn
        #: depth or new-part size), and the shared class alone.
        by: dict[int, list[int]] = {}
        for c in range(self.nclasses - 1):
            by.setdefault(c % (2 * nf), []).append(c)
        self._groups: list[list[int]] = [*by.values(), [self._shared_cls]]
        #: Learned (survival data per class): reuses by age bin (lifetimes that ended in a reuse), lifetimes
        #: that left the ghost unreused by age bin (censored), and lifetimes still open (the block's last
        #: access is in the ghost) counted per time slot of their start; all accesses per class.
        #: Kept by begin() and _trim_meta() only.
        self._hits = [[0.0] * _NBINS for _ in range(self.nclasses)]
        self._gone = [[0.0] * _NBINS for _ in range(self.nclasses)]
        self._open: list[dict[int, int]] = [{} for _ in range(self.nclasses)]
        self._life = [0.0] * self.nclasses
        for c in range(self.nclasses):
            self._hits[c][0] = w.prior_hits
            self._gone[c][-1] = max(w.prior_lifetimes - w.prior_hits, 0.0)
            self._life[c] = w.prior_lifetimes
        #: The refresh's copies of _hits and _gone as arrays, and the classes whose rows changed since
        #: (marked where _hits / _gone are written), so a refresh converts a few rows, not the whole table.
        self._hits_np = np.array(self._hits)
        self._gone_np = np.array(self._gone)
        self._dirty: set = set()
        #: Density table per class and age bin (recomputed every refresh_requests): lists, or with the
        #: compiled heaps (``_dh``) the array they were given.
        self._hd = [[1.0] * _NBINS for _ in range(self.nclasses)]
        #: The compiled class heaps (kvroute.kvindex's DensityHeaps: heaps of the classes >= 0 and their
        #: victim snapshot), made by bind() when the core has them and depth_cost is 0; None: the Python
        #: heaps below hold every class.  The hinted heaps (-1, -2) stay in Python either way.
        self._dh = None
        #: Ghost + resident metadata: key -> [last access time, class, uses seen (0: provisional, see
        #: _new_meta)]; oldest first.  Kept by begin(), _new_meta() and _trim_meta() only.
        self._meta: OrderedDict = OrderedDict()
        #: Time since the request the current prompt extends (None: it extends none); set by begin().
        self._gap: float | None = None
        #: Output tokens of the request being begun (RequestInfo.output_tokens; None: unknown).
        self._out: int | None = None
        #: Prompt-end markers: key -> (turn depth, time) of the request whose prompt ended there.
        self._endof: OrderedDict = OrderedDict()
        #: key -> distinct successors seen (a tuple of up to 3 keys).
        self._succ: OrderedDict = OrderedDict()
        self._ghost_cap = w.ghost_min
        #: Capacity of the tier (from bind), for the characteristic time.
        self.capacity = 0
        #: Characteristic time T in seconds (capacity / insertion rate).
        self.T = 60.0
        self._ins_count = 0
        self._t0: float | None = None
        #: EWMA of victims' densities (admission threshold); None until the first eviction.
        self._victim_hd: float | None = None
        #: Blocks resident in this tier: key -> depth.
        self._res: dict[Hashable, int] = {}
        #: Candidate heaps per class of (last access, seq, key); _cand[key] = (class, seq).
        #: ... then two more heaps at the end, reached by the negative "classes": ``_heaps[-1]`` the router-hinted
        #: blocks, ``_heaps[-2]`` the blocks with a client's expected return time (see request_info).
        self._heaps: list[list] = [[] for _ in range(self.nclasses + 2)]
        #: Classes whose heap may be non-empty (every push adds its class; the victim snapshot drops the
        #: empty ones), so a snapshot looks at a few heaps, not at all of them.
        self._filled: set = set()
        self._cand: dict[Hashable, tuple[int, int]] = {}
        self._seq = 0
        #: Heap entries pushed since the last compaction (stale ones included); see _push.
        self._pushed = 0
        #: Victim snapshot (see _learned_victim): the ``now`` it ranks the class heads at (None: stale),
        #: the heap of ranks and each class's current rank.  Kept by _learned_victim and _snap_push;
        #: reset by _refresh, hint and on_clear.
        self._vnow: float | None = None
        self._vheap: list = []
        self._vtop: dict = {}
        #: Hinted rates: key -> requests per second (router's cluster-wide view).
        self._hint: dict[Hashable, float] = {}
        #: Candidate heap of hinted blocks: (rate, seq, key).
        self._hint_heap: list = self._heaps[-1]
        #: Candidate heap of blocks whose session said when it returns: (-expected return time, seq, key).
        self._ret_heap: list = self._heaps[-2]
        #: Client hints: key -> absolute time its session's next request is expected (RequestInfo.
        #: expected_return_s); bounded like the ghost.  Written by begin() (the GPU tier's, shared by the host).
        self._ret: OrderedDict = OrderedDict()
        #: The RequestInfo of the request whose begin() comes next (None: none given).
        self._info = None
        self._requests = 0
        self._accesses = 0
        self._now = 0.0
        #: Turn depth and non-tail class of the request being served (from begin()).
        self._td = 1
        self._base_cls = 0
        #: Role of the tier this instance serves, "gpu" or "host" (set by the cache before bind()).
        self.tier_role = "gpu"
        #: Host tier: capacity of the tier above it (GPU blocks), set by the cache before bind();
        #: the host tier's shadows model the whole cache (GPU + host blocks).
        self.upper_capacity = 0
        #: Duel experts (None, LRU, ARC) fed every hook over the real candidates; None: no duel.
        self._experts: tuple | None = None
        #: Decayed duel score per expert (EXPERTS order); higher is better.
        self.scores = [0.0, 0.0, 0.0]
        #: Per expert, since the leader last changed (decayed like the scores): the sum of its per-request
        #: hit surplus over the leader, and the sum of that surplus squared (the significance test).
        self._surplus = [0.0, 0.0, 0.0]
        self._surplus_sq = [0.0, 0.0, 0.0]
        #: Expert whose decisions the cache follows now (index into EXPERTS); changed by _set_leader only.
        self.leader = 0
        #: Host tier of a two-tier cache without a duel: the GPU tier's policy (its insertions and
        #: capacity give the whole cache's characteristic time; see _union_admit).  Set by follow().
        self._upper: "Adaptive | None" = None
        #: GPU tier of a two-tier cache without a duel: the host tier's policy.  Set by follow().
        self._lower: "Adaptive | None" = None
        #: GPU tier of a two-tier cache: the host tier's policy whose leader this one follows.
        self._verdict: "Adaptive | None" = None
        #: One shadow cache per expert (EXPERTS order), built by bind(); None: no duel.
        self._shadows: tuple | None = None
        #: Which shadows hold each of this tier's candidates, and the drop order that follows (the
        #: host tier's own shadows, or the host tier's for the GPU tier of a two-tier cache); None: no duel.
        #: Kept by set_candidate, on_remove, the shadows' callbacks and _duel (the leader).
        self._votes: Votes | None = None
        #: Host tier: the Votes the shadows' callbacks keep (this tier's and the GPU tier's).
        self._listeners: list[Votes] = []
        #: Counters: requests counted by the duel, eviction decisions per leader.
        self.duel_stats = {"requests": 0, "led": [0, 0, 0]}

    # --------------------------------------------------------------- learning
    def bind(self, capacity: int) -> None:
        self.capacity = capacity
        if _NATIVE is not None and not self.w.depth_cost:
            self._dh = _NATIVE.DensityHeaps(self.nclasses, _EDGES, _NBINS, float(self.w.density_quantum))
            self._hd = np.array(self._hd)
            self._dh.set_table(self._hd)
        self._ghost_cap = max(self.w.ghost_min, int(self.w.ghost_factor * capacity))
        self._duel_setup()

    def _trim(self, od: OrderedDict) -> None:
        cap = self._ghost_cap
        while len(od) > cap:
            od.popitem(last=False)

    def _trim_meta(self, now: float) -> None:
        """Bound the ghost; a lifetime that leaves it unreused is censored at its age."""
        meta, cap, gone, dirty = self._meta, self._ghost_cap, self._gone, self._dirty
        while len(meta) > cap:
            _, (t, c, _f) = meta.popitem(last=False)
            self._close(c, t)
            gone[c][_bin(now - t)] += 1.0
            dirty.add(c)

    def _new_meta(self, key: Hashable, t: float, c: int) -> list:
        """Provisional ghost entry (use count 0) for a block the policy meets outside begin(): a resident
        block whose entry the ghost dropped, or one an engine tier stored before the request that
        brought it reached begin() (vLLM's CPU tier calls the policy's request hook only when the
        request finishes).  begin() then counts the block's use as its first, not as a reuse at age 0.
        It opens a lifetime of class ``c`` from ``t``."""
        m = self._meta[key] = [t, c, 0]
        self._opened(c, t)
        return m

    def _opened(self, c: int, t: float) -> None:
        """A lifetime of class ``c`` starting at ``t`` is open (the twin of :meth:`_close`)."""
        op = self._open[c]
        s = int(t // _SLOT)
        op[s] = op.get(s, 0) + 1

    def _close(self, c: int, t: float) -> None:
        """A lifetime of class ``c`` that started at ``t`` is no longer open."""
        d = self._open[c]
        s = int(t // _SLOT)
        n = d[s] - 1
        if n:
            d[s] = n
        else:
            del d[s]

    def request_info(self, info) -> None:
        """Keep the request's :class:`~kvroute.eviction.base.RequestInfo` for the begin() that follows."""
        self._info = info

    def begin(self, keys: Sequence[Hashable], now: float) -> None:
        w = self.w
        self._now = now
        info, self._info = self._info, None
        self._out = info.output_tokens if info is not None else None
        up = self._upper
        if up is not None:  # host tier without a duel: the GPU tier (called first) learned this request
            if self._hd is not up._hd:
                self._hd, self.T = up._hd, up.T
                self._vnow = None
                if self._dh is not None:
                    self._dh.set_table(self._hd)
            return
        if self._shadows is not None:
            self._duel(keys, now)
        if self._t0 is None:
            self._t0 = now
        meta, succ, endof = self._meta, self._succ, self._endof
        n = len(keys)
        # turn depth: the deepest previously seen block of this prompt
        m = 0
        while m < n and (e := meta.get(keys[m])) is not None and e[2]:
            m += 1
        td = 1
        self._gap = None
        if m:
            b = keys[m - 1]
            d = endof.get(b)
            if d is not None and len(succ.get(b, ())) <= 2:
                td = d[0] + 1
                self._gap = now - d[1]
        self._td = td
        tdc = self._request_class(keys, now, td, n - m)
        self._base_cls = tdc * 2 * self._nf
        self._see(keys, 0, tdc, now)
        self._ended(keys, td, n, now)
        if info is not None and info.expected_return_s is not None:  # a client hint: the whole prompt waits for it
            ret, r = self._ret, now + max(0.0, float(info.expected_return_s))
            for k in keys:
                ret[k] = r
                ret.move_to_end(k)
            self._trim(ret)
        elif self._ret:
            for k in keys:  # no hint this time: the blocks follow their class again
                self._ret.pop(k, None)
        self._requests += 1
        if self._requests % w.refresh_requests == 1:
            self._refresh(now)

    def extend(self, keys: Sequence[Hashable], start: int, now: float) -> None:
        """``keys[start:]`` joined the chain of a request whose ``keys[:start]`` :meth:`begin` saw: the
        blocks of its response, which an engine hashes as it generates them and a next turn reuses.  They
        are used once by that request, in its class; its old last block stops being its tail, and the
        request's end marker (turn depth) moves to the new last block.  A no-op unless
        ``0 < start < len(keys)``."""
        n = len(keys)
        if not 0 < start < n:
            return
        self._now = now
        nf = self._nf
        last_key = keys[start - 1]
        last = self._meta.get(last_key)
        d = self._endof.get(last_key)
        td = d[0] if d is not None else 1
        self._gap = None
        if last is None or last[1] == self._shared_cls:
            tdc = self._request_class(keys, now, td, n - start)
        else:
            c = last[1]
            tdc = c // (2 * nf)
            if c // nf % 2:  # it was the prompt's tail: its open lifetime moves to the non-tail class
                self._reclass(last_key, last, c - nf)
        self._see(keys, start, tdc, now)
        self._ended(keys, td, n - start, now)

    def _reclass(self, key: Hashable, m: list, c: int) -> None:
        """Move ``key``'s open lifetime (ghost entry ``m``) to class ``c``."""
        old = m[1]
        self._close(old, m[0])
        self._life[old] -= 1.0
        self._life[c] += 1.0
        self._opened(c, m[0])
        m[1] = c
        e = self._cand.get(key)
        if e is not None and e[0] >= 0:  # a candidate in a class heap (hinted ones wait in the hint heap)
            self._file(key)

    def _see(self, keys: Sequence[Hashable], start: int, tdc: int, now: float) -> None:
        """Account one use of each of ``keys[start:]`` by a request of class ``tdc`` (``keys[:start]``
        precede them in the chain): close their previous lifetimes (a reuse, or a provisional entry's first
        use), open new ones in their class, re-file unpinned candidates, and record successors."""
        meta, succ = self._meta, self._succ
        n = len(keys)
        nf = self._nf
        fb, fmax = self._fbucket, len(self._fbucket) - 1
        hits, life, opens, dirty = self._hits, self._life, self._open, self._dirty
        shared = self._shared_cls
        cand = self._cand
        slot = int(now // _SLOT)
        base = tdc * 2 * nf
        bisect_right, elast, nlast = bisect.bisect_right, _EDGES[-1], _NBINS - 1
        prev = keys[start - 1] if start else None
        for i in range(start, n):
            k = keys[i]
            old = meta.get(k)
            if old is None:
                f = 1
            else:
                oc, ot = old[1], old[0]
                d = opens[oc]  # its open lifetime closes (inlined _close: the hot path)
                os_ = int(ot // _SLOT)
                x = d[os_] - 1
                if x:
                    d[os_] = x
                else:
                    del d[os_]
                meta.move_to_end(k)
                if old[2]:  # a reuse
                    a = now - ot  # inlined _bin
                    hits[oc][(0 if a <= 0.0 else bisect_right(_EDGES, a) - 1) if a < elast else nlast] += 1.0
                    dirty.add(oc)
                    f = old[2] + 1
                else:  # provisional (stored by an engine before its request reached begin): first use
                    f = 1
            s = succ.get(k)
            if s is not None and len(s) > 2:
                c = shared
            else:
                c = base + (nf if i == n - 1 else 0) + fb[f if f < fmax else fmax]
            if old is None:
                meta[k] = [now, c, f]
            else:
                old[0], old[1], old[2] = now, c, f
            life[c] += 1.0
            op = opens[c]
            op[slot] = op.get(slot, 0) + 1
            e = cand.get(k)
            if e is not None and e[0] >= 0:  # an unpinned candidate (engine tiers): re-file it by class and time
                self._seq += 1
                cand[k] = (c, self._seq)
                if self._dh is not None:
                    self._dh.withdraw(e[1])
                    self._dh.push(c, now, self._seq, k)
                else:
                    self._push(c, (now, self._seq, k))
                    if self._vnow == now:
                        self._snap_left(e)
                        self._snap_push(c)
            if prev is not None:
                ps = succ.get(prev)
                if ps is None:
                    succ[prev] = (k,)
                elif len(ps) < 3 and k not in ps:
                    succ[prev] = ps + (k,)
            prev = k

    def _ended(self, keys: Sequence[Hashable], td: int, used: int, now: float) -> None:
        """After a request's blocks were seen: its end markers (turn depth ``td``), the access count
        (``used`` blocks; counts are halved every ``half_life_accesses``), and the ghost's bounds."""
        w, endof = self.w, self._endof
        n = len(keys)
        if n >= 2:
            endof[keys[-2]] = (td, now)
        if n:
            endof[keys[-1]] = (td, now)
        self._accesses += used
        if self._accesses >= w.half_life_accesses:
            self._accesses = 0
            for c in range(self.nclasses):
                self._life[c] *= 0.5
                h, g = self._hits[c], self._gone[c]
                self._dirty.add(c)
                for j in range(_NBINS):
                    h[j] *= 0.5
                    g[j] *= 0.5
        self._trim_meta(now)
        self._trim(self._succ)
        self._trim(endof)

    def _request_class(self, keys: Sequence[Hashable], now: float, depth: int, new_blocks: int) -> int:
        """Request class (0 .. max_turn_class * (len(new_block_edges) + 1) - 1) of a prompt from its turn
        depth and the size of its new part.  The one place a request's features become a class:
        ``bench/eviction_ceiling.py`` overrides it to measure what better features would be worth."""
        w = self.w
        b = bisect.bisect_right(w.new_block_edges, new_blocks)
        if self._ng > 1:  # the chain's rhythm: time since the request it extends (0: none, a first turn)
            b = b * self._ng + (bisect.bisect_right(w.gap_edges, self._gap) if self._gap is not None else 0)
        if self._no > 1:  # the output length (RequestInfo.output_tokens; unknown: bucket 0)
            o = self._out
            b = b * self._no + (bisect.bisect_right(w.out_edges, o) if o is not None else 0)
        return (min(depth, w.max_turn_class) - 1) * self._nb + b

    # ------------------------------------------------------------------ duel
    def _duel_setup(self) -> None:
        """The experts (LRU and ARC, fed every hook over the real candidates) and one shadow
        cache per expert (learned, LRU, ARC) that serves every request on its own.  The learned shadow
        is built as ``type(self)(self.w, duel=False)``: a subclass that runs a duel must take that call."""
        self._experts = self._shadows = None
        if not self.w.duel or self.tier_role != "host" or self.capacity < 1:
            return
        cap = self.capacity + self.upper_capacity
        self._experts = (None, LRU(), ARC())
        self._shadows = tuple(
            ShadowCache(cap, p, functools.partial(self._shadow_add, i), functools.partial(self._shadow_drop, i))
            for i, p in enumerate((type(self)(self.w, duel=False), LRU(), ARC())))
        self._votes = Votes(self._shadows)
        self._listeners = [self._votes]

    def follow(self, host: "Adaptive") -> None:
        """GPU tier of a two-tier cache: follow the verdict of ``host``'s duel (its shadows model
        the whole cache), with this tier's own LRU and ARC experts.  Called once, before use."""
        if not self.w.duel or host._shadows is None:
            host._upper = self  # no duel: both tiers value blocks over the whole cache's horizon, and
            self._lower = host  # the host reads what this tier learns (both would learn the same)
            host._meta, host._open, host._hits, host._gone, host._life, host._ret = (
                self._meta, self._open, self._hits, self._gone, self._life, self._ret)
            host._hits_np, host._gone_np, host._dirty = self._hits_np, self._gone_np, self._dirty
            # the ghost remembers blocks past the whole cache (a host block must not lose its history)
            self._ghost_cap = max(self.w.ghost_min, int(self.w.ghost_factor * (self.capacity + host.capacity)))
            return
        self._experts = (None, LRU(), ARC())
        self._verdict = host
        self._votes = Votes(host._shadows)
        self._votes.set_leader(host.leader)
        host._listeners.append(self._votes)

    def _set_leader(self, i: int) -> None:
        """Host tier: follow expert ``i`` (both tiers' drop orders are re-sorted); the significance
        test starts over against the new leader."""
        self.leader = i
        self._surplus = [0.0] * len(self.scores)
        self._surplus_sq = [0.0] * len(self.scores)
        for v in self._listeners:
            v.set_leader(i)

    def _shadow_add(self, i: int, key: Hashable) -> None:
        """Shadow ``i`` holds ``key`` (again)."""
        for v in self._listeners:
            v.held(i, key)

    def _shadow_drop(self, i: int, key: Hashable) -> None:
        """Shadow ``i`` dropped ``key``."""
        for v in self._listeners:
            v.dropped(i, key)

    def _duel(self, keys: Sequence[Hashable], now: float) -> None:
        """Serve the request in every shadow and pick the leader: the expert whose shadow hit
        most lately (decayed), the learned one unless another beats it by ``duel_margin`` with a
        significant lead (``duel_z``)."""
        w = self.w
        d = w.duel_decay
        sc, su, sq = self.scores, self._surplus, self._surplus_sq
        hit = [0] * len(sc)
        for i, sh in enumerate(self._shadows):
            t = sh.start_request(keys, now)
            sh.finish_request(t, now)
            sc[i] = sc[i] * d + t.hit
            hit[i] = t.hit
        lead = self.leader
        d2 = d * d  # the squares carry the squared weights (a weighted sum's variance)
        for i in range(len(sc)):
            x = hit[i] - hit[lead]
            su[i] = su[i] * d + x
            sq[i] = sq[i] * d2 + x * x
        best = max(range(len(sc)), key=sc.__getitem__)
        # hysteresis: a switch costs hits, and early leads (few requests, few evictions) are mostly noise
        if sc[best] > sc[lead] * (1.0 + w.duel_margin) and su[best] > w.duel_z * math.sqrt(sq[best]):
            self._set_leader(best)
        self.duel_stats["requests"] += 1

    def _refresh(self, now: float) -> None:
        """Recompute T and every class's density per age bin (hazards as :func:`_at_risk` and
        :func:`_shrunk` define them, computed for all classes at once with numpy: same arithmetic,
        same order)."""
        up, lo = self._upper, self._lower
        ins, cap = self._ins_count, self.capacity
        if up is not None:
            ins, cap = up._ins_count, cap + up.capacity
        elif lo is not None:
            cap += lo.capacity
        if self._t0 is not None and now > self._t0 and ins and cap:
            rate = ins / (now - self._t0)
            self.T = max(1.0, cap / rate)
        T = self.T * self.w.horizon_factor
        k = self.w.shrink
        C = self.nclasses
        hits, gone, dirty = self._hits_np, self._gone_np, self._dirty
        if dirty:  # the rows written since the last refresh (same values as np.array(self._hits))
            rows = sorted(dirty)
            dirty.clear()
            hits[rows] = [self._hits[c] for c in rows]
            gone[rows] = [self._gone[c] for c in rows]
        self._vnow = None  # the victim snapshot used the old tables
        if self._dh is not None:  # the compiled twins of the numpy code below (tests compare them exactly);
            ob = _NATIVE.open_bins(self._open, now, _SLOT, self._dh)  # the compiled heaps hold the table,
            self._hd = _NATIVE.hazard_table(hits, gone, ob, self._groups, k, T, _MIDS, _A0)  # _density reads it
            self._dh.set_table(self._hd)
            return
        cls: list = []
        slots: list = []
        cnt: list = []
        for c, op in enumerate(self._open):  # open lifetimes per age bin (see _at_risk), as _bin bins them
            if op:
                cls += [c] * len(op)
                slots += op.keys()
                cnt += op.values()
        ages = now - (np.array(slots, float) + 0.5) * _SLOT
        bins = np.searchsorted(_EDGES_NP, ages, side="right") - 1
        bins[ages >= _EDGES[-1]] = _NBINS - 1
        bins[ages <= 0.0] = 0
        # integer counts: their float sums are exact in any order
        ob = np.bincount(np.array(cls, np.int64) * _NBINS + bins, weights=np.array(cnt, float),
                         minlength=C * _NBINS).reshape(C, _NBINS)
        # risk[j] = acc + hits[j] + gone[j] + ob[j]/2, acc the sum over later bins (as _at_risk)
        x = (hits + gone) + ob
        acc = np.zeros((C, _NBINS))
        acc[:, :-1] = np.cumsum(x[:, :0:-1], axis=1)[:, ::-1]
        risk = ((acc + hits) + gone) + 0.5 * ob

        def pooled(cs) -> tuple:  # sums over classes, row after row (as the scalar reference adds them)
            idx = np.asarray(cs)
            return hits[idx].sum(axis=0), risk[idx].sum(axis=0)

        def shrunk(h, r, prior):  # _shrunk, vectorised
            d = r + k
            return np.where(d > 0, (h + k * prior) / np.where(d > 0, d, 1.0), prior)

        ah, ar = pooled(range(C))
        top = np.where(ar > 0, ah / np.where(ar > 0, ar, 1.0), 0.0)
        lam = np.empty((C, _NBINS))
        for cs in self._groups:  # every class shrinks toward its group (see _groups), every group toward all
            gh, gr = pooled(cs)
            glam = shrunk(gh, gr, top)
            idx = np.array(cs)
            lam[idx] = shrunk(hits[idx], risk[idx], glam)
        self._hd = _density_table(lam, T).tolist()

    # ------------------------------------------------------------------ cache
    def _density(self, key: Hashable, cls: int, t_last: float) -> float:
        if self._dh is not None:  # depth_cost is 0 (see bind)
            return self._dh.value(cls, t_last, self._now)
        v = self._hd[cls][_bin(self._now - t_last)]
        if self.w.depth_cost:
            v *= 1.0 + self.w.depth_cost * self._res.get(key, 0)
        return v

    def admit(self, key: Hashable, depth: int, now: float) -> bool:
        if len(self._res) < self.capacity:
            return True
        if self._votes is not None:  # two tiers: keep what the leading expert's whole-cache shadow keeps
            return self._votes.holds(key) or key in self._hint
        if self._upper is not None:  # host tier, no duel: the whole cache drops its least valuable leaf
            return self._union_admit(key)
        thr = self._victim_hd if self._lower is None else self._lower._victim_hd
        if thr is None:
            return True
        m = self._meta.get(key)
        if m is None:
            return True
        if self._hint.get(key, 0.0) >= thr:
            return True
        if key in self._ret:  # its session said it returns: keep it until then (the victim order decides)
            return True
        if self.leader if self._verdict is None else self._verdict.leader:  # _lead(): LRU and ARC admit everything
            return True
        dh = self._dh  # the class's density at age 0 (_density, inlined for the compiled heaps)
        v = dh.value(m[1], now, self._now) if dh is not None else self._density(key, m[1], now)
        return v >= self.w.admit_ratio * thr


    def _union_admit(self, key: Hashable) -> bool:
        """Host tier of a two-tier cache without a duel, full: take ``key`` (demoted, or refused by the GPU)
        only when it is worth more than this tier's own victim, which it would displace.  GPU + host then
        drop, of the two, the block of lower density at its age (older first among equals): one learned
        cache of their summed size, at the price of one comparison, instead of shadow caches."""
        if key in self._hint:
            return True
        m = self._meta.get(key)
        if m is None:
            return True
        dh = self._dh
        if dh is not None and not self._hint_heap and not self._ret_heap and key not in self._ret:
            return dh.outranks(m[1], m[0], self._now)  # the comparison below, in one compiled call
        e = self._peek()
        if e is None:
            return True
        rt = self._ret.get(key)
        if rt is not None and rt > self._now:
            v = 1.0 / max(rt - self._now, 0.125)
        else:
            v = self._density(key, m[1], m[0])
        q = self.w.density_quantum
        lv = (math.floor(math.log2(v) / q) if v > 0 else -math.inf) if q else v
        return (lv, m[0]) > (e[0], e[1])

    def on_insert(self, key: Hashable, depth: int, now: float) -> None:
        self._res[key] = depth
        self._ins_count += 1
        if key not in self._meta:  # a block the policy never saw in begin() (direct use)
            self._new_meta(key, now, self._base_cls)
        if self._experts is not None:
            for e in self._experts[1:]:
                e.on_insert(key, depth, now)

    def on_access(self, key: Hashable, now: float) -> None:
        if self._experts is not None:
            for e in self._experts[1:]:
                e.on_access(key, now)

    def on_release(self, key: Hashable, now: float) -> None:
        if self._experts is not None:
            for e in self._experts[1:]:
                e.on_release(key, now)

    def set_candidate(self, key: Hashable, flag: bool) -> None:
        dh = self._dh
        if dh is not None and self._experts is None and self._votes is None:  # the hot path (no duel, compiled)
            cand = self._cand
            if not flag:
                e = cand.pop(key, None)
                if e is not None and e[0] >= 0:
                    dh.withdraw(e[1])
                return
            if (self._ret or self._hint) and (key in self._ret or key in self._hint):
                self._file(key)
                return
            m = self._meta.get(key)
            if m is None:
                m = self._new_meta(key, self._now, 0)
            self._seq += 1
            seq = self._seq
            c = m[1]
            old = cand.get(key)
            cand[key] = (c, seq)
            if old is not None and old[0] >= 0:
                dh.withdraw(old[1])
            dh.push(c, m[0], seq, key)
            return
        if self._experts is not None:
            lru, arc = self._experts[1:]
            if flag:  # a candidate never inserted (engine adapters): the experts learn it now
                if key not in lru._rel:
                    lru.on_insert(key, 0, self._now)
                if key not in arc._list:
                    arc.on_insert(key, 0, self._now)
            lru.set_candidate(key, flag)
            arc.set_candidate(key, flag)
        if self._votes is not None:
            (self._votes.add if flag else self._votes.discard)(key)
        if not flag:
            e = self._cand.pop(key, None)
            if e is not None:
                self._left(e)
            return
        self._file(key)

    def _file(self, key: Hashable) -> None:
        """File candidate ``key`` in the learned expert's heaps: by class and last access, or by hinted rate."""
        m = self._meta.get(key)
        if m is None:
            m = self._new_meta(key, self._now, 0)
        self._seq += 1
        old = self._cand.get(key)
        rt = self._ret.get(key)
        if rt is not None:  # the client said when its session returns
            self._cand[key] = (-2, self._seq)
            self._push(-2, (-rt, self._seq, key))
            if self._dh is not None:
                if old is not None:
                    self._left(old)
            elif self._vnow == self._now:
                if old is not None:
                    self._snap_left(old)
                self._snap_push(-2)
            return
        r = self._hint.get(key)
        if r is not None:  # hinted blocks wait in their own heap, lowest rate first
            self._cand[key] = (-1, self._seq)
            self._push(-1, (r, self._seq, key))
            if self._dh is not None:
                if old is not None:
                    self._left(old)
            elif self._vnow == self._now:
                if old is not None:
                    self._snap_left(old)
                self._snap_push(-1)
            return
        c = m[1]
        self._cand[key] = (c, self._seq)
        if self._dh is not None:
            if old is not None:
                self._left(old)
            self._dh.push(c, m[0], self._seq, key)
            return
        self._push(c, (m[0], self._seq, key))
        if self._vnow == self._now:
            if old is not None:
                self._snap_left(old)
            self._snap_push(c)

    def _left(self, entry: tuple) -> None:
        """Candidate entry ``(class, seq)`` left its heap (withdrawn, removed or re-filed; ``_cand`` already
        says so): the compiled heaps drop it, or the Python victim snapshot re-ranks its class."""
        if self._dh is not None:
            if entry[0] >= 0:
                self._dh.withdraw(entry[1])
        elif self._vnow == self._now:
            self._snap_left(entry)

    def _push(self, c: int, entry: tuple) -> None:
        """Push a candidate entry into class ``c``'s heap; drop the stale ones (re-filed, pinned, removed)
        once they outnumber the live ones, as :class:`HeapPolicy` does.  Victims come from Votes first in a
        two-tier cache, so _head() alone would rarely reach them and the heaps would grow with every request."""
        heapq.heappush(self._heaps[c], entry)
        self._filled.add(c)
        self._pushed += 1
        if self._pushed > 4 * len(self._cand) + 1024:
            cand = self._cand
            n = 0
            for h in self._heaps:
                h[:] = [e for e in h if (x := cand.get(e[2])) is not None and x[1] == e[1]]
                heapq.heapify(h)
                n += len(h)
            self._pushed = n

    def _head(self, c: int):
        if c >= 0 and self._dh is not None:
            return self._dh.head(c)
        h, cand = self._heaps[c], self._cand
        while h:
            t, seq, key = h[0]
            e = cand.get(key)
            if e is not None and e[1] == seq:
                return t, seq, key
            heapq.heappop(h)
        return None

    def victim(self) -> Hashable | None:
        """The leading expert's victim; disagreements are remembered for the duel."""
        if self._experts is None and self._votes is None and self._verdict is None:  # no duel: learned only
            self.duel_stats["led"][self.leader] += 1
            dh = self._dh
            if dh is None or self._hint_heap or self._ret_heap:
                return self._learned_victim()
            e = dh.peek(self._now)  # _learned_victim and _peek, inlined
            if e is None:
                return None
            a, hd = self.w.victim_ewma, e[5]
            self._victim_hd = hd if self._victim_hd is None else (1 - a) * self._victim_hd + a * hd
            return e[4]
        lead = self._lead()
        self.duel_stats["led"][lead] += 1
        if self._votes is not None:  # two tiers: first the blocks the shadows have dropped
            v = self._votes.victim()
            if v is not None:
                return v
        if lead:
            v = self._experts[lead].victim()
            if v is not None:
                return v
        return self._learned_victim()

    def _lead(self) -> int:
        """Index of the expert whose decisions this tier follows now."""
        return self.leader if self._verdict is None else self._verdict.leader

    def _class_head(self, c: int) -> tuple | None:
        """``(level, last access, class, seq, key, density)`` of class ``c``'s head at ``self._now`` (``c``
        -1: the hinted heap), or None when the class has no candidate.  ``level`` is the density, quantised
        by ``density_quantum`` (densities within a factor ``2 ** q`` compare as equal: the older goes)."""
        e = self._head(c)
        if e is None:
            return None
        t, seq, key = e
        if c == -2:  # its session returns at -t: one hit in that many seconds, or its class's density once overdue
            m = self._meta.get(key)
            wait = -t - self._now
            t = m[0] if m is not None else self._now
            v = 1.0 / max(wait, 0.125) if wait > 0 or m is None else self._density(key, m[1], m[0])
        elif c < 0:  # hinted: t is the rate; density at least the rate
            m = self._meta.get(key)
            v = max(t, self._density(key, m[1], m[0])) if m is not None else t
            t = m[0] if m is not None else self._now
        else:
            v = self._density(key, c, t)
        q = self.w.density_quantum
        lv = (math.floor(math.log2(v) / q) if v > 0 else -math.inf) if q else v
        return (lv, t, c, seq, key, v)

    def _snap_push(self, c: int) -> None:
        """Class ``c`` got a new heap entry while the victim snapshot is current: re-rank the class when
        the entry may be its new head (an older block re-filed, or a class that had no candidate)."""
        tr = self._vtop.get(c)
        h = self._heaps[c]
        if tr is None or c < 0 or h[0][:2] < (tr[1], tr[3]):
            e = self._class_head(c)
            if e is not None and (tr is None or e[3] != tr[3]):
                heapq.heappush(self._vheap, e)
                self._vtop[c] = e

    def _snap_left(self, entry: tuple) -> None:
        """Candidate entry ``(class, seq)`` left its class (withdrawn, removed or re-filed) while the victim
        snapshot is current: when it was its class's ranked head, rank the class's next head."""
        c = entry[0]
        tr = self._vtop.get(c)
        if tr is not None and tr[3] == entry[1]:
            e = self._class_head(c)
            if e is None:
                del self._vtop[c]
            else:
                heapq.heappush(self._vheap, e)
                self._vtop[c] = e

    def _learned_victim(self) -> Hashable | None:
        """The class head with the lowest density (older first among equals; then the lower class);
        its density feeds the admission threshold."""
        e = self._peek()
        if e is None:
            return None
        a = self.w.victim_ewma
        hd = e[5]
        self._victim_hd = hd if self._victim_hd is None else (1 - a) * self._victim_hd + a * hd
        return e[4]

    def _victim_by_scan(self) -> Hashable | None:
        """Reference for :meth:`_peek` (tests compare them): rank every class's head now, keep the
        lowest.  No side effects besides dropping stale heap entries."""
        best = None
        for c in range(-2, self.nclasses):
            e = self._class_head(c)
            if e is not None and (best is None or e[:3] < best[:3]):
                best = e
        return None if best is None else best[4]

    def _peek(self) -> tuple | None:
        """The learned victim's rank ``(level, last access, class, seq, key, density)``, or None.

        The class heads' ranks at ``now`` sit in a small heap (``_vheap``) that lives as long as ``now``
        and the density tables do: an eviction re-ranks only the class it took from, and a re-filed
        candidate only its own class (:meth:`_snap_push`), instead of every class's head per victim.
        With the compiled heaps, they keep that snapshot for the classes >= 0, and the hinted heaps'
        heads (rare) are ranked here on every call."""
        dh = self._dh
        if dh is not None:
            e = dh.peek(self._now)
            if self._hint_heap or self._ret_heap:
                for c in (-2, -1):
                    x = self._class_head(c)
                    if x is not None and (e is None or x[:3] < e[:3]):
                        e = x
            return e
        if self._vnow != self._now:
            self._vnow = self._now
            heaps = self._heaps
            vh = []
            filled = self._filled
            for c in list(filled):  # most classes have no candidate
                if not heaps[c]:
                    filled.discard(c)
                    continue
                e = self._class_head(c)
                if e is not None:
                    vh.append(e)
            heapq.heapify(vh)
            self._vheap = vh
            self._vtop = {e[2]: e for e in vh}
        vh, vtop, cand = self._vheap, self._vtop, self._cand
        while vh:
            e = vh[0]
            c = e[2]
            x = cand.get(e[4])
            if vtop.get(c) is e:
                if x is not None and x[1] == e[3]:
                    break
                heapq.heappop(vh)  # the class's head left: rank its next one
                ne = self._class_head(c)
                if ne is None:
                    del vtop[c]
                else:
                    heapq.heappush(vh, ne)
                    vtop[c] = ne
            else:
                heapq.heappop(vh)  # superseded by a newer rank of its class
        else:
            return None
        return e

    def on_remove(self, key: Hashable) -> None:
        e = self._cand.pop(key, None)
        if e is not None:
            if self._dh is not None:
                if e[0] >= 0:
                    self._dh.withdraw(e[1])
            else:
                self._left(e)
        self._res.pop(key, None)
        if self._votes is not None:
            self._votes.discard(key)
        if self._experts is not None:
            for e in self._experts[1:]:
                e.on_remove(key)

    def on_clear(self) -> None:
        """The duel's shadows model this cache, so they start over empty too (their policies keep what
        they learned, and the scores stay: the experts' records on this workload still count).  A shadow's
        clear() reports no drops, so both tiers' votes are recomputed (empty after TieredCache.clear(),
        which removes every candidate first)."""
        self._vnow = None
        if self._dh is not None:
            self._dh.invalidate()
        if self._shadows is not None:
            for sh in self._shadows:
                sh.clear()
            for v in self._listeners:
                v.rebuild()

    def hint(self, popularity: Mapping[Hashable, float]) -> None:
        """Replace the hinted rates (requests/s per block) with ``popularity``."""
        new = {k: float(v) for k, v in popularity.items() if v > 0}
        moved = [k for k in set(self._hint) | set(new) if k in self._cand and self._hint.get(k) != new.get(k)]
        self._hint = new
        self._vnow = None  # hinted blocks move between heaps
        for k in moved:  # re-file candidates whose hint changed (the learned heaps only: the experts'
            self._file(k)  # and the duel's orders do not look at hints)

    def candidates(self) -> int:
        return len(self._cand)

    def describe(self) -> dict:
        """Learned state; the duel's leader, scores and request count are the host tier's when this
        is the GPU tier of a two-tier cache (which follows that duel), its own eviction counts per leader."""
        duel = self._verdict or self
        return {
            "name": self.name, "T": round(self.T, 2), "victim_hd": self._victim_hd,
            "continuation": self.continuation(), "weights": asdict(self.w),
            "leader": EXPERTS[self._lead()], "scores": [round(x, 2) for x in duel.scores],
            "duel": {**self.duel_stats, "requests": duel.duel_stats["requests"],
                     "led": dict(zip(EXPERTS, self.duel_stats["led"]))},
        }

    def continuation(self) -> dict[str, float]:
        """Learned probability of reuse (within the ghost's memory) per non-tail turn-depth class."""
        out = {}
        for d in range(self.w.max_turn_class):
            for b in range(self._nb):
                c = (d * self._nb + b) * 2 * self._nf
                if self._life[c] > self.w.prior_lifetimes:
                    out[f"turn{d + 1}/new{b}"] = round(sum(self._hits[c]) / self._life[c], 3)
        return out


