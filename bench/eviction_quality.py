#!/usr/bin/env python3
"""Eviction quality on a Mooncake-format trace: prefix hit ratios of every policy, side by side.

    python bench/eviction_quality.py --trace mooncake_conversation.jsonl \\
        --capacity 0.01,0.05,0.1,0.25 --policies lru,lfu,lrfu,arc,s3fifo,sieve,wtinylfu,belady,adaptive \\
        [--host-ratio 4] [--no-gpu-admission] [--limit N] [--json] [--explain]

Each policy replays the trace (requests in order, one cache) at each capacity,
given as a share of the trace's unique blocks; a request's hit is its longest
cached prefix.  ``--host-ratio R`` adds a host tier of R x the GPU capacity
(GPU hits, host hits).  ``--no-gpu-admission`` makes the GPU tier take every
block, as an engine's pool must (a block the policy would refuse still displaces
a victim; policies only order evictions).  libcachesim's policies (s3fifo,
sieve, wtinylfu, lcs_arc, lcs_lru) are counted by default on libcachesim's own
cache with prefix semantics (``--lcs-mode presence``: the longest prefix
libcachesim holds), or followed inside kvroute's cache (``--lcs-mode follow``,
always with a host tier).

``--json`` prints ``{policy: {capacity: {"prefix_hit_ratio": x, "gpu_hit_ratio": y,
"host_hit_ratio": z}}}``; otherwise a table, the share of the LRU-to-Belady gap
each policy closes (when lru and belady are both run) and, with ``--explain``,
where each policy's remaining misses come from.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from kvroute.eviction import LIBCACHESIM_POLICIES, POLICIES
from kvroute.eviction.replay import (capacity_blocks, client_hints, load_trace, miss_breakdown, online_info, replay,
                                    unique_blocks)
from kvroute.kvindex.errors import KVRouteError
from kvroute.traces import TraceError


#: Fields of every ``--json`` cell (a contract: scripts compare figures through them).
JSON_FIELDS = ("prefix_hit_ratio", "gpu_hit_ratio", "host_hit_ratio")


def run_policy(reqs, name: str, gpu: int, host: int, lcs_mode: str, explain: bool,
               gpu_admission: bool = True, progress=None, infos=None, params=None) -> dict:
    if name in LIBCACHESIM_POLICIES and lcs_mode == "presence" and not host:
        if name not in POLICIES:
            raise SystemExit(f"{name}: libcachesim is not installed (pip install libcachesim)")
        from kvroute.eviction.policies.libcachesim_wrap import presence_replay

        r = presence_replay(reqs, gpu, LIBCACHESIM_POLICIES[name])
        if progress is not None:
            progress(len(reqs))
        return {"prefix_hit_ratio": r["prefix"], "gpu_hit_ratio": r["prefix"], "host_hit_ratio": 0.0,
                "present_hit_ratio": r["present"]}
    if explain:
        r = miss_breakdown(reqs, gpu, name, host, gpu_admission=gpu_admission)
        if progress is not None:
            progress(len(reqs))
        return r
    r = replay(reqs, gpu, name, host, gpu_admission=gpu_admission, progress=progress, infos=infos, params=params)
    return {k: r[k] for k in ("prefix_hit_ratio", "gpu_hit_ratio", "host_hit_ratio")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default="mooncake_conversation.jsonl",
                    help="path, a bundled trace name, or a generated workload gen:NAME[:k=v,...] (as kvroute sim)")
    ap.add_argument("--capacity", default="0.01,0.05,0.1,0.25", help="shares of the trace's unique blocks")
    ap.add_argument("--policies", default="lru,lfu,lrfu,arc,belady,adaptive")
    ap.add_argument("--host-ratio", type=float, default=0.0, help="host tier size as a multiple of the GPU's")
    ap.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    ap.add_argument("--lcs-mode", choices=("presence", "follow"), default="presence")
    ap.add_argument("--no-gpu-admission", dest="gpu_admission", action="store_false",
                    help="the GPU tier takes every block, as an engine's GPU pool must (policies only order "
                         "evictions); libcachesim's policies in presence mode run on their own cache, unchanged")
    ap.add_argument("--client-hints", action="store_true",
                    help="pass each request's client hints (session, expected return time: the session's next "
                         "arrival, from the trace) to the policies as plain data; only adaptive reads them")
    ap.add_argument("--adaptive-weights", default=None, metavar="JSON",
                    help="overrides of adaptive's Weights, e.g. '{\"out_edges\": [512]}' (lists become tuples)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--explain", action="store_true", help="attribute the remaining misses (slower)")
    ap.add_argument("--timing", action="store_true",
                    help="with --json: add {'_timing_us_per_block': {policy: microseconds}} (a machine-dependent figure)")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    a = ap.parse_args(argv)
    shares = [s.strip() for s in a.capacity.split(",") if s.strip()]
    weights = None
    if a.adaptive_weights:
        try:
            weights = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(a.adaptive_weights).items()}
            from kvroute.eviction.policies.adaptive import Weights

            Weights(**weights)  # unknown or invalid weights are refused here, before any replay
        except (ValueError, AttributeError, TypeError, KVRouteError) as exc:
            ap.error(f"--adaptive-weights takes a JSON object of adaptive's Weights; got {a.adaptive_weights!r}: {exc}")
    try:
        if not shares or not all(0 < float(s) < float("inf") for s in shares):
            raise ValueError
    except ValueError:
        ap.error(f"--capacity takes shares (> 0) of the unique blocks, comma-separated; got {a.capacity!r}")
    if a.host_ratio < 0 or (a.limit is not None and a.limit < 1):
        ap.error("--host-ratio must be >= 0 and --limit >= 1")
    try:
        if a.trace.startswith("gen:"):  # a generated workload (kvroute.sim.workloads), e.g. held-out checks
            from kvroute.eviction.replay import Request
            from kvroute.sim.workloads import from_spec

            reqs = [Request(r.arrival_s, r.hash_ids, r.output_length) for r in from_spec(a.trace)][: a.limit]
        else:
            reqs = load_trace(a.trace, limit=a.limit)
    except TraceError as exc:
        ap.error(str(exc))
    uniq = unique_blocks(reqs)
    infos = client_hints(reqs) if a.client_hints else online_info(reqs)
    names = [p.strip() for p in a.policies.split(",") if p.strip()]
    for n in names:
        if n not in POLICIES and n not in LIBCACHESIM_POLICIES:
            ap.error(f"unknown policy {n!r}; registered: {', '.join(sorted(POLICIES))}")
    out: dict[str, dict[str, dict]] = {}
    secs: dict[str, float] = {}
    accesses = sum(len(r.keys) for r in reqs)
    bar = None
    if a.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(names) * len(shares) * len(reqs), unit="req", file=sys.stderr, mininterval=0.5,
                   leave=False)
    for n in names:
        out[n] = {}
        t0 = time.process_time()  # CPU seconds: the machine is shared, wall time swings with others' load
        for s in shares:
            gpu = capacity_blocks(float(s), uniq)
            host = int(round(a.host_ratio * gpu))
            if bar is not None:
                bar.set_description(f"{n} {s}")
            try:
                out[n][s] = run_policy(reqs, n, gpu, host, a.lcs_mode, a.explain, a.gpu_admission,
                                       bar.update if bar is not None else None, infos,
                                       weights if n == "adaptive" else None)
            except KVRouteError as exc:  # e.g. a libcachesim policy below its smallest capacity
                ap.error(f"{n} at capacity {s} ({gpu} blocks): {exc}")
        secs[n] = time.process_time() - t0
    if bar is not None:
        bar.close()
    # time per block access, and against LRU's (the speed target: adaptive at most 2x LRU)
    usb = {n: secs[n] / max(1, accesses * len(shares)) * 1e6 for n in names}
    if a.json:  # the contract's three fields (plus the miss attribution with --explain)
        keep = JSON_FIELDS + (("misses",) if a.explain else ())
        doc = {n: {s: {k: c[k] for k in keep if k in c} for s, c in cells.items()} for n, cells in out.items()}
        if a.timing:
            doc["_timing_us_per_block"] = {n: round(v, 3) for n, v in usb.items()}
        print(json.dumps(doc, indent=1))
        return 0
    print(f"# {a.trace}: {len(reqs)} requests, {sum(len(r.keys) for r in reqs)} block accesses, "
          f"{uniq} unique blocks; host ratio {a.host_ratio:g}"
          + ("" if a.gpu_admission else "; no GPU admission (an engine's GPU pool)")
          + ("; client hints (session, expected return)" if a.client_hints else ""))
    print("policy".ljust(10) + "".join(f"{s:>22}" for s in shares) + "   cpu s  us/block  x LRU")
    for n in names:
        cells = []
        for s in shares:
            r = out[n][s]
            cell = f"{r['prefix_hit_ratio']:.4f}"
            if a.host_ratio:
                cell += f" ({r['gpu_hit_ratio']:.3f}+{r['host_hit_ratio']:.3f})"
            cells.append(cell.rjust(22))
        ratio = f"{usb[n] / usb['lru']:6.2f}" if "lru" in usb and usb["lru"] > 0 else "     -"
        print(n.ljust(10) + "".join(cells) + f"   {secs[n]:7.1f}  {usb[n]:8.2f}  {ratio}")
    if "lru" in out and "belady" in out:
        print("\nshare of the LRU-to-Belady gap closed")
        for n in names:
            if n in ("lru", "belady"):
                continue
            row = []
            for s in shares:
                lo, hi = out["lru"][s]["prefix_hit_ratio"], out["belady"][s]["prefix_hit_ratio"]
                v = out[n][s]["prefix_hit_ratio"]
                row.append((f"{(v - lo) / (hi - lo):+.2f}" if hi > lo else "n/a").rjust(22))
            print(n.ljust(10) + "".join(row))
        base = [n for n in names if n not in ("belady", "adaptive")]
        if "adaptive" in out and base:
            print("\nadaptive minus the best baseline (" + ",".join(base) + ")")
            row = []
            for s in shares:
                best = max(out[b][s]["prefix_hit_ratio"] for b in base)
                row.append(f"{out['adaptive'][s]['prefix_hit_ratio'] - best:+.4f}".rjust(22))
            print("adaptive".ljust(10) + "".join(row))
    present = [n for n in names if "present_hit_ratio" in out[n][shares[0]]]
    if present:
        print("\nblocks libcachesim held (a hit only when the whole prefix up to them was held too)")
        for n in present:
            print(n.ljust(10) + "".join(f"{out[n][s]['present_hit_ratio']:.4f}".rjust(22) for s in shares))
    if a.explain:
        print("\nwhere the misses come from (shares of all block accesses)")
        for n in names:
            for s in shares:
                r = out[n][s]
                if "misses" in r:
                    print(f"{n:10} {s:>6}: " + ", ".join(f"{k} {v:.4f}" for k, v in r["misses"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
