"""Block-level trace replay: load a Mooncake-format trace and replay it through a TieredCache.

A trace is JSON lines ``{"timestamp": ms, "input_length": tokens, "hash_ids": [ids]}``;
``hash_ids`` are prefix-chained block ids.  :func:`replay` serves requests in
order, one at a time (start then finish), counting a request's hit as its
longest cached prefix; capacities are in blocks (see :func:`capacity_blocks`
for shares of the trace's unique blocks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from .. import traces
from ..traces import TraceError  # noqa: F401  (re-exported: callers catch it from here)
from .base import EvictionPolicy, RequestInfo
from .tiered import TieredCache


@dataclass(frozen=True, slots=True)
class Request:
    """One trace row, as the block-level replay needs it."""

    #: Arrival time in seconds.
    ts: float
    #: Block ids in chain order.
    keys: tuple[int, ...]
    #: Tokens generated (the trace's ``output_length``; 0 when unknown).
    output_length: int = 0


def load_trace(path: str, limit: int | None = None) -> list[Request]:
    """Read a Mooncake-format trace (path or bundled name, see :mod:`kvroute.traces`);
    ``limit`` keeps the first rows.  A bad line raises :class:`kvroute.traces.TraceError`."""
    return [Request(r.arrival_s, r.hash_ids, r.output_length) for r in traces.load_trace(path, limit=limit)]


def unique_blocks(reqs: Iterable[Request]) -> int:
    """Number of distinct block ids in the requests."""
    seen: set[int] = set()
    for r in reqs:
        seen.update(r.keys)
    return len(seen)


def capacity_blocks(share: float, unique: int) -> int:
    """Blocks for a capacity given as a share of the unique blocks (at least 1)."""
    return max(1, int(round(share * unique)))


def sessions(reqs: Sequence[Request]) -> list[int]:
    """Session of each request, inferred online from prefixes: a request whose prompt runs through
    the last full block of an earlier prompt (its second-to-last block; the last may be partial)
    continues that prompt's session, unless that block has more than two distinct successors (a
    shared prefix such as a system prompt); otherwise it starts a new session.  The traces carry no
    session ids: this stands for what a client would tag its requests with."""
    end: dict[int, int] = {}
    succ: dict[int, set] = {}
    out: list[int] = []
    n = 0
    for r in reqs:
        keys = r.keys
        sid = -1
        for i in range(len(keys) - 1, -1, -1):
            s = end.get(keys[i])
            if s is not None:
                if len(succ.get(keys[i], ())) <= 2:
                    sid = s
                break
        if sid < 0:
            sid, n = n, n + 1
        out.append(sid)
        for a, b in zip(keys, keys[1:]):
            x = succ.get(a)
            if x is None:
                succ[a] = {b}
            elif len(x) <= 2:
                x.add(b)
        for k in keys[-2:]:
            end[k] = sid
    return out


def client_hints(reqs: Sequence[Request]) -> list[RequestInfo]:
    """Per request, what an agent harness could tell the cache: its session and when that session's
    next request comes (taken from the trace's future: an upper bound on what such hints are worth;
    infinity after a session's last request: the harness knows the session is done), plus the output
    length (an engine knows it)."""
    sid = sessions(reqs)
    nxt: dict[int, float] = {}
    ret: list[float | None] = [None] * len(reqs)
    for i in range(len(reqs) - 1, -1, -1):
        t = nxt.get(sid[i])
        ret[i] = math.inf if t is None else t - reqs[i].ts
        nxt[sid[i]] = reqs[i].ts
    return [RequestInfo(output_tokens=r.output_length, session=s, expected_return_s=x)
            for r, s, x in zip(reqs, sid, ret)]


def online_info(reqs: Sequence[Request]) -> list[RequestInfo]:
    """Per request, what an engine knows without client hints: the output length only."""
    return [RequestInfo(output_tokens=r.output_length) for r in reqs]


def make_tier_policy(name: str, reqs: Sequence[Request], params: dict | None = None) -> Callable[[], EvictionPolicy]:
    """A factory for ``name`` (``params`` go to its constructor); oracles get the trace's future."""
    from . import make_policy

    if name == "belady":
        future = [r.keys for r in reqs]
        return lambda: make_policy("belady", future=future, **(params or {}))
    return lambda: make_policy(name, **(params or {}))


def _replay_cache(reqs: Sequence[Request], gpu_blocks: int, policy: str, host_blocks: int,
                  gpu_admission: bool, on_event: Callable[[Any], Any] | None = None,
                  params: dict | None = None) -> TieredCache:
    """The cache :func:`replay` and :func:`miss_breakdown` run: ``policy`` (with ``params``) on both tiers."""
    fac = make_tier_policy(policy, reqs, params)
    return TieredCache(gpu_blocks, host_blocks, fac, host_policy=fac, on_event=on_event,
                       gpu_admission=gpu_admission)


def replay(
    reqs: Sequence[Request],
    gpu_blocks: int,
    policy: str = "lru",
    host_blocks: int = 0,
    *,
    on_event: Callable[[Any], Any] | None = None,
    gpu_admission: bool = True,
    progress: Callable[[int], Any] | None = None,
    infos: Sequence[RequestInfo] | None = None,
    params: dict | None = None,
) -> dict[str, Any]:
    """Replay requests in order; returns hit ratios (over all blocks) and the cache's counters.

    ``gpu_admission=False``: the GPU tier takes every block (an engine's pool, see :class:`TieredCache`).
    ``progress(n)`` is called after every 256 requests and at the end with the requests served since
    its last call (a tqdm ``update``).  ``infos[i]`` goes with request ``i`` (:func:`client_hints`,
    :func:`online_info`).  ``params`` go to the policy's constructor (e.g. adaptive's weights)."""
    cache = _replay_cache(reqs, gpu_blocks, policy, host_blocks, gpu_admission, on_event, params)
    start, finish = cache.start_request, cache.finish_request
    done = 0
    for i, r in enumerate(reqs):
        t = start(r.keys, r.ts, infos[i] if infos is not None else None)
        finish(t, r.ts)
        if progress is not None:
            done += 1
            if done == 256:
                progress(done)
                done = 0
    if progress is not None and done:
        progress(done)
    st = cache.stats()
    total = max(1, st["blocks"])
    return {
        "prefix_hit_ratio": (st["gpu_hits"] + st["host_hits"]) / total,
        "gpu_hit_ratio": st["gpu_hits"] / total,
        "host_hit_ratio": st["host_hits"] / total,
        "stats": st,
        "policy": cache.policies[0].describe(),
    }


#: Age bins (seconds since the block's previous use) for :func:`miss_breakdown`.
MISS_AGE_BINS = ((30.0, "<30s"), (120.0, "30-120s"), (480.0, "120-480s"), (float("inf"), ">=480s"))


def miss_breakdown(
    reqs: Sequence[Request], gpu_blocks: int, policy: str = "lru", host_blocks: int = 0, *,
    gpu_admission: bool = True,
) -> dict[str, Any]:
    """:func:`replay` plus where the misses come from, as shares of all block accesses.

    ``cold``: blocks never seen before (no cache can hit them).  The others were
    seen before, and an infinite cache would have hit them: ``not admitted``
    (the policy refused them at their previous use), or evicted, by the time
    since their previous use (``evicted <30s`` ...).  ``hit + cold + the rest = 1``.
    """
    cache = _replay_cache(reqs, gpu_blocks, policy, host_blocks, gpu_admission)
    last: dict[int, float] = {}
    refused_at: set[int] = set()
    miss: dict[str, int] = {"cold": 0, "not admitted": 0}
    for _, label in MISS_AGE_BINS:
        miss["evicted " + label] = 0
    total = 0
    for r in reqs:
        keys = r.keys
        refused_before = cache.stats()["refused"]
        t = cache.start_request(keys, r.ts)
        cache.finish_request(t, r.ts)
        hit = t.hit
        for j in range(hit, len(keys)):
            k = keys[j]
            prev = last.get(k)
            if prev is None:
                miss["cold"] += 1
            elif k in refused_at:
                miss["not admitted"] += 1
            else:
                age = r.ts - prev
                for edge, label in MISS_AGE_BINS:
                    if age < edge:
                        miss["evicted " + label] += 1
                        break
        stop = hit + t.inserted + t.stored_host  # blocks refused by the GPU may still be cached on the host
        if cache.stats()["refused"] > refused_before:
            refused_at.update(keys[stop:])
        refused_at.difference_update(keys[:stop])
        for k in keys:
            last[k] = r.ts
        total += len(keys)
    st = cache.stats()
    n = max(1, total)
    return {
        "prefix_hit_ratio": (st["gpu_hits"] + st["host_hits"]) / n,
        "gpu_hit_ratio": st["gpu_hits"] / n,
        "host_hit_ratio": st["host_hits"] / n,
        "misses": {k: v / n for k, v in miss.items()},
    }
