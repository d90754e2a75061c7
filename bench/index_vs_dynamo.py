"""kvroute's hashing + index, both backends (compiled core and pure-Python reference), against
Dynamo's Rust RadixTree: same workload, one run.

Workload: 64 workers, 8,192-token prompts at block size 16 (512 blocks), each a
shared system prompt (one of 24, 1-4K tokens) plus a unique suffix; workers
announce prompts as an engine would (a system prompt once per worker, then only
the new suffix blocks, chained on it) until the index holds >= 1M (block,
worker) entries.  Queries: new prompts behind a cached system prompt (the
common case), repeats of stored prompts (full hits) and cold prompts.

Measured (timings: CPU time of the process, all its threads, all sides in one process,
repetitions interleaved so machine noise hits them alike; each side's previous index is dropped
and the process left to go idle before anything is timed -- see settle(); memory: each side
built in its own subprocess so RSS deltas are clean):
  * store:  ours = KVIndex.apply() of decoded BlockStored events (content hashes
            computed from the tokens inside; the events carry ``token_bytes``, as
            kvroute's vLLM decoder produces them); Dynamo = RadixTree.apply_event() of
            prebuilt JSON (its local hashes precomputed, not timed).
  * query:  ours = KVIndex.match_tokens() (hash + match; the compiled index hashes
            only as far as some worker matches, but converts and checks every token);
            Dynamo = compute_block_hash_for_seq() + RadixTree.find_matches().
  * churn:  the steady state after the build: each worker stores one more prompt behind a
            system prompt it holds and evicts its oldest stored prompt (a BlockStored and a
            BlockRemoved event of the same length, one batch), so the index stays at ~1M entries
            and no table grows; blocks stored per second (as many removed).  Ours = apply() of
            decoded batches; Dynamo = apply_event() of both prebuilt JSON events.  The build
            above starts from an empty index on both sides, so it also times every table growth
            (ours: rehashes of the block table and the per-worker alias maps; Dynamo: its hash
            maps and tree nodes) -- a start-up cost a running router pays once.
  * memory: RSS growth while the index is built, per (block, worker) entry; also at 16M
            (block, worker) entries / 256 workers (--big-entries; built from content hashes
            with store(), and for Dynamo from prebuilt events; --big-sides picks the sides).
  * route:  Router.route (kvroute policy, pending table, load model) on the same 1M index,
            each backend, against Dynamo's bare compute_block_hash_for_seq + find_matches
            (the 300 queries routed in a row, then finished untimed).  Twice: with the
            prompts as Python int lists (Dynamo's fastest input: it takes a numpy array ~5x slower),
            and as uint32 numpy arrays (``route_u32``: the sidecar's wire format, uint32-LE bytes
            read by np.frombuffer), both against Dynamo on lists.

Sides: native = kvroute.kvindex.native.NativeKVIndex + the core's hashing; python = the
reference kvroute.kvindex.index.KVIndex + py_block_hash_list; dynamo = ai-dynamo-runtime.

Usage: python bench/index_vs_dynamo.py [--entries 1000000] [--reps 5] [--churn-prompts 512] [--big-entries 16000000] [--json]
Needs: pip install ai-dynamo-runtime==1.6.1 (the [bench] extra).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

BS = 16
PROMPT_TOKENS = 8192
WORKERS = 64
N_SYSTEM = 24


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def workload(target_entries: int, seed: int = 0):
    """Events per worker as (worker, parent_ext, ext_hashes, tokens) and query prompts."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, 128000, int(rng.integers(64, 257)) * BS, dtype=np.uint32) for _ in range(N_SYSTEM)]
    events = []
    stored_prompts = []
    have = [set() for _ in range(WORKERS)]
    entries = 0
    p = 0
    while entries < target_entries:
        w = p % WORKERS
        s = int(rng.integers(0, N_SYSTEM))
        sysp = systems[s]
        suffix = rng.integers(0, 128000, PROMPT_TOKENS - len(sysp), dtype=np.uint32)
        ns = len(sysp) // BS
        sys_ext = [s * 1_000_000 + j + 1 for j in range(ns)]
        suf_ext = [(p + 1) * 1_000_000_000 + j for j in range(len(suffix) // BS)]
        if s not in have[w]:
            have[w].add(s)
            events.append((w, None, sys_ext, sysp))
            entries += ns
        events.append((w, sys_ext[-1], suf_ext, suffix))
        entries += len(suf_ext)
        stored_prompts.append(np.concatenate([sysp, suffix]))
        p += 1
    queries = []
    for i in range(300):
        kind = i % 3
        if kind == 0:  # new question behind a cached system prompt
            sysp = systems[int(rng.integers(0, N_SYSTEM))]
            q = np.concatenate([sysp, rng.integers(0, 128000, PROMPT_TOKENS - len(sysp), dtype=np.uint32)])
        elif kind == 1:  # a repeat of a stored prompt (full hit)
            q = stored_prompts[int(rng.integers(0, len(stored_prompts)))]
        else:  # cold
            q = rng.integers(0, 128000, PROMPT_TOKENS, dtype=np.uint32)
        queries.append([int(x) for x in q])
    return events, queries, entries


def churn_workload(events, n_prompts: int, seed: int = 2):
    """Steady-state events: (worker, parent_ext, ext, tokens, evicted_ext) per churn step.

    Worker w stores a new prompt behind one of the system prompts it announced and evicts its
    oldest stored suffix (FIFO), so its block count stays about the same.
    """
    rng = np.random.default_rng(seed)
    systems: dict[int, list[tuple[int, int]]] = {}  # worker -> [(last system ext, system blocks)]
    fifo: dict[int, list[list[int]]] = {}
    for w, parent, ext, _ in events:
        if parent is None:
            systems.setdefault(w, []).append((ext[-1], len(ext)))
        else:
            fifo.setdefault(w, []).append(ext)
    out = []
    for i in range(n_prompts):
        w = i % WORKERS
        last, ns = systems[w][int(rng.integers(0, len(systems[w])))]
        n = PROMPT_TOKENS // BS - ns
        ext = [10**15 + i * 1_000_000 + j for j in range(n)]
        toks = rng.integers(0, 128000, n * BS, dtype=np.uint32)
        out.append((w, last, ext, toks, fifo[w].pop(0)))
    return out


class Ours:
    """One kvroute backend: ``native`` (compiled core) or ``python`` (the reference)."""

    def __init__(self, events, backend: str):
        from kvroute.kvindex import BlockStored, EventBatch, hashing
        from kvroute.kvindex.index import KVIndex as PyKVIndex

        self.name = backend
        if backend == "native":
            from kvroute.kvindex.native import NativeKVIndex

            self.cls, hash_fn = NativeKVIndex, hashing.block_hash_list
        else:
            self.cls, hash_fn = PyKVIndex, hashing.py_block_hash_list
        self._new = lambda: self.cls(BS)
        self._hash = lambda q: hash_fn(q, BS)
        self.batches = [
            (w, EventBatch(0.0, (BlockStored(tuple(ext), parent, tuple(int(x) for x in toks), BS,
                                             token_bytes=toks.astype("<u4").tobytes()),)))
            for w, parent, ext, toks in events
        ]
        self.churn_batches = []

    def set_churn(self, churn):
        from kvroute.kvindex import BlockRemoved, BlockStored, EventBatch

        self.churn_batches = [
            (w, EventBatch(0.0, (BlockStored(tuple(ext), parent, tuple(int(x) for x in toks), BS,
                                             token_bytes=toks.astype("<u4").tobytes()),
                                 BlockRemoved(tuple(gone)))))
            for w, parent, ext, toks, gone in churn
        ]

    def drop(self):
        self.index = None

    def churn(self):
        index = self.index
        for w, b in self.churn_batches:
            index.apply(w, b)

    def build(self):
        index = self._new()
        for w, b in self.batches:
            index.apply(w, b)
        self.index = index

    def hash(self, q):
        return self._hash(q)

    def query(self, q):
        m = self.index.match_tokens(q)  # hash + match (the compiled one stops hashing where the match ends)
        return max((o.total for o in m.values()), default=0)

    def router(self):
        from kvroute.router import Router

        return Router(list(range(WORKERS)), BS, index=self.index)


class Dynamo:
    name = "dynamo"

    def __init__(self, events):
        from dynamo._core import RadixTree, compute_block_hash_for_seq

        self._new = RadixTree
        self._hash_fn = compute_block_hash_for_seq
        self.payloads = []
        for i, (w, parent, ext, toks) in enumerate(events):
            local = compute_block_hash_for_seq([int(x) for x in toks], BS)
            ev = {"event_id": i, "dp_rank": 0,
                  "data": {"stored": {"parent_hash": parent,
                                      "blocks": [{"block_hash": e, "tokens_hash": h} for e, h in zip(ext, local)]}}}
            self.payloads.append((w, json.dumps(ev).encode()))
        self.churn_payloads = []

    def set_churn(self, churn):
        from dynamo._core import compute_block_hash_for_seq

        self.churn_payloads = []
        for i, (w, parent, ext, toks, gone) in enumerate(churn):
            local = compute_block_hash_for_seq([int(x) for x in toks], BS)
            st = {"event_id": 2 * i, "dp_rank": 0,
                  "data": {"stored": {"parent_hash": parent,
                                      "blocks": [{"block_hash": e, "tokens_hash": h} for e, h in zip(ext, local)]}}}
            rm = {"event_id": 2 * i + 1, "dp_rank": 0, "data": {"removed": {"block_hashes": list(gone)}}}
            self.churn_payloads.append((w, json.dumps(st).encode(), json.dumps(rm).encode()))

    def drop(self):
        self.tree = None

    def churn(self):
        tree = self.tree
        for w, st, rm in self.churn_payloads:
            tree.apply_event(w, st)
            tree.apply_event(w, rm)

    def build(self):
        tree = self._new()
        for w, pl in self.payloads:
            tree.apply_event(w, pl)
        self.tree = tree

    def hash(self, q):
        return self._hash_fn(q, BS)

    def query(self, q):
        sc = self.tree.find_matches(self._hash_fn(q, BS)).scores
        return max(sc.values(), default=0)


SIDES = {"native": lambda ev: Ours(ev, "native"), "python": lambda ev: Ours(ev, "python"), "dynamo": Dynamo}


def big_workload(target_entries: int, workers: int, seed: int = 1):
    """Content-hash chains for the memory run at scale: (worker, content hashes, engine hashes) per event.

    The 1M workload's shape (per worker: each of 24 system prompts once, then 512-block prompts
    behind one), without tokens: content hashes are drawn at random (a chain's hashes are
    random 64-bit values anyway), engine hashes are distinct ints.
    """
    rng = np.random.default_rng(seed)
    sys_len = [int(rng.integers(64, 257)) for _ in range(N_SYSTEM)]
    systems = [rng.integers(0, 2**63, n, dtype=np.uint64) for n in sys_len]
    have = [set() for _ in range(workers)]
    entries = 0
    p = 0
    while entries < target_entries:
        w = p % workers
        s = int(rng.integers(0, N_SYSTEM))
        if s not in have[w]:
            have[w].add(s)
            yield w, systems[s], np.arange(len(systems[s]), dtype=np.uint64) + np.uint64(s * 1_000_000 + 1), None
            entries += len(systems[s])
        n = PROMPT_TOKENS // BS - sys_len[s]
        yield w, rng.integers(0, 2**63, n, dtype=np.uint64), np.arange(n, dtype=np.uint64) + np.uint64((p + 1) * 1_000_000_000), (s, sys_len[s])
        entries += n
        p += 1


def memory_big(side: str, entries: int, workers: int) -> None:
    """Build a 16M-entry / 256-worker index in this (fresh) process and print its RSS growth."""
    gc.collect()
    rss0 = rss_bytes()
    if side == "dynamo":
        from dynamo._core import RadixTree

        tree = RadixTree()
        n = 0
        for i, (w, hs, ext, sysinfo) in enumerate(big_workload(entries, workers)):
            parent = None if sysinfo is None else int(sysinfo[0] * 1_000_000 + sysinfo[1])
            ev = {"event_id": i, "dp_rank": 0, "data": {"stored": {"parent_hash": parent, "blocks": [
                {"block_hash": int(e), "tokens_hash": int(h)} for e, h in zip(ext, hs)]}}}
            tree.apply_event(w, json.dumps(ev).encode())
            n += len(hs)
        keep = tree
    else:
        from kvroute.kvindex.index import KVIndex as PyKVIndex

        if side == "native":
            from kvroute.kvindex.native import NativeKVIndex as cls
        else:
            cls = PyKVIndex
        index = cls(BS)
        for w, hs, ext, _ in big_workload(entries, workers):
            index.store(w, hs, engine_hashes=ext.tolist())
        n = len(index)
        keep = index
    gc.collect()
    print(json.dumps({"rss_bytes": rss_bytes() - rss0, "entries": n}))
    del keep


def timed(fn, *args) -> float:
    """CPU seconds of this process, all threads (Dynamo applies events on threads of its own;
    preemption by other processes on a shared machine does not count)."""
    t0 = time.process_time()
    fn(*args)
    return time.process_time() - t0


def settle(quiet_s: float = 0.05, limit_s: float = 3.0) -> None:
    """Wait until this process's threads stop using CPU (at most limit_s).

    Dropping a Dynamo RadixTree of 1M entries leaves ~15-25 ms of CPU work on another thread
    after the call returns; timed right after, Dynamo's next measurement paid for it (its
    queries read ~25% slower right after a replacing build than after a pause; measured
    2026-12-03).  Each side's previous index is therefore dropped, and this waited for,
    before anything is timed.
    """
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        c0 = time.process_time()
        time.sleep(quiet_s)
        if time.process_time() - c0 < 0.02 * quiet_s:
            return


def memory_child(side: str, entries: int) -> None:
    """Build one side's index in a fresh process and print its RSS growth."""
    events, _, n = workload(entries)
    impl = SIDES[side](events)
    gc.collect()
    gc.freeze()
    rss0 = rss_bytes()
    impl.build()
    gc.collect()
    extra = impl.index.stats()["bytes_estimate"] if side != "dynamo" else None
    print(json.dumps({"rss_bytes": rss_bytes() - rss0, "estimate": extra}))


def run_timing(entries: int, reps: int = 5, churn_prompts: int = 512) -> dict:
    """All sides in one process, repetitions interleaved, so machine noise hits them alike."""
    events, queries, n = workload(entries)
    churn = churn_workload(events, churn_prompts)
    churn_blocks = sum(len(c[2]) for c in churn)
    sides = [SIDES[k](events) for k in ("native", "python", "dynamo")]
    for impl in sides:
        impl.set_churn(churn)
    gc.collect()
    gc.freeze()  # the workload's own objects are long-lived input, not index state: keep them out of GC passes
    blocks = sum(len(e[2]) for e in events)
    res = {impl.name: {"store": [], "query": [], "hash": [], "route": [], "route_u32": [], "churn": []} for impl in sides}
    queries_u32 = [np.asarray(q, dtype=np.uint32) for q in queries]
    for rep in range(reps):
        for impl in sides:
            r = res[impl.name]
            impl.drop()  # the previous repetition's index: freed, and settled, before any timing
            gc.collect()
            settle()
            r["store"].append(timed(impl.build))
            settle()
            r["query"].append(timed(lambda: [impl.query(q) for q in queries]) / len(queries))
            r["hash"].append(timed(lambda: [impl.hash(q) for q in queries]) / len(queries))
            if impl.name == "dynamo":
                r["churn"].append(timed(impl.churn))
                continue
            router = impl.router()
            for i, q in enumerate(queries[:30]):  # warm up (and leave the pending table realistic)
                router.route(q, request_id=("w", rep, i))
                router.finish(("w", rep, i))

            def routes():  # Router.route alone: the requests stay in flight until after the timing
                for i, q in enumerate(queries):
                    router.route(q, request_id=(rep, i))
            r["route"].append(timed(routes) / len(queries))
            for i in range(len(queries)):
                router.finish((rep, i))

            def routes_u32():  # the same prompts as uint32 arrays (the sidecar's wire format)
                for i, q in enumerate(queries_u32):
                    router.route(q, request_id=("u", rep, i))
            r["route_u32"].append(timed(routes_u32) / len(queries))
            for i in range(len(queries)):
                router.finish(("u", rep, i))
            r["churn"].append(timed(impl.churn))  # last: the queries above ran on the built index
    nat, py, dyn = sides
    ref = [dyn.query(q) for q in queries[:60]]
    assert [nat.query(q) for q in queries[:60]] == ref and [py.query(q) for q in queries[:60]] == ref, \
        "the indexes disagree on overlaps"
    med = {k: {m: statistics.median(v) if v else float("nan") for m, v in d.items()} for k, d in res.items()}
    ratio = {}
    for side in ("native", "python"):
        ratio[side] = {m: statistics.median([a / b for a, b in zip(res[side][m], res["dynamo"][m])])
                       for m in ("store", "query", "hash", "churn")}
        # Router.route against Dynamo's bare hash + find_matches
        for m in ("route", "route_u32"):
            ratio[side][m] = statistics.median([a / b for a, b in zip(res[side][m], res["dynamo"]["query"])])
    return {"entries": nat.index.stats()["entries"], "blocks": blocks, "churn_blocks": churn_blocks, "median": med,
            "ratio_of_reps": ratio}


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"memory run {args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--big-entries", type=int, default=16_000_000, help="memory run at scale (0: skip)")
    ap.add_argument("--big-workers", type=int, default=256)
    ap.add_argument("--big-sides", default="native,dynamo", help="sides of the run at scale (python: ~2.5 GB, minutes)")
    ap.add_argument("--churn-prompts", type=int, default=512, help="steady-state churn steps (one prompt stored, one evicted)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--memory-side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--memory-big", choices=sorted(SIDES), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_side:
        memory_child(a.memory_side, a.entries)
        return
    if a.memory_big:
        memory_big(a.memory_big, a.big_entries, a.big_workers)
        return
    mem = {side: _child(["--memory-side", side, "--entries", str(a.entries)]) for side in SIDES}
    big = {}
    if a.big_entries:
        for side in a.big_sides.split(","):
            big[side] = _child(["--memory-big", side, "--big-entries", str(a.big_entries), "--big-workers", str(a.big_workers)])
    t = run_timing(a.entries, a.reps, a.churn_prompts)
    n, blocks, med, rr = t["entries"], t["blocks"], t["median"], t["ratio_of_reps"]
    cblocks = t["churn_blocks"]
    d = med["dynamo"]
    summary: dict = {"entries": n, "workers": WORKERS, "prompt_tokens": PROMPT_TOKENS, "block_size": BS, "reps": a.reps,
                     "loadavg": os.getloadavg()[0]}
    for side in ("native", "python"):
        o = med[side]
        summary[side] = {
            "hash_match_us": o["query"] * 1e6, "hash_match_ratio": rr[side]["query"],
            "hash_only_us": o["hash"] * 1e6, "hash_only_ratio": rr[side]["hash"],
            "store_blocks_per_s": blocks / o["store"], "store_ratio": 1 / rr[side]["store"],
            "churn_blocks_per_s": cblocks / o["churn"], "churn_ratio": 1 / rr[side]["churn"],
            "bytes_per_entry_rss": mem[side]["rss_bytes"] / n, "bytes_per_entry_estimate": mem[side]["estimate"] / n,
            "bytes_ratio": mem[side]["rss_bytes"] / max(mem["dynamo"]["rss_bytes"], 1),
            "route_us": o["route"] * 1e6, "route_ratio": rr[side]["route"],
            "route_u32_us": o["route_u32"] * 1e6, "route_u32_ratio": rr[side]["route_u32"],
        }
    summary["dynamo"] = {"hash_match_us": d["query"] * 1e6, "hash_only_us": d["hash"] * 1e6,
                         "store_blocks_per_s": blocks / d["store"], "churn_blocks_per_s": cblocks / d["churn"],
                         "bytes_per_entry_rss": mem["dynamo"]["rss_bytes"] / n}
    summary["big"] = {side: {"entries": b["entries"], "workers": a.big_workers, "bytes_per_entry_rss": b["rss_bytes"] / b["entries"]}
                      for side, b in big.items()}
    nat = summary["native"]
    summary["targets_met"] = {
        "native hash+match <= 0.5x dynamo": nat["hash_match_ratio"] <= 0.5,
        "native store >= 2.0x dynamo": nat["store_ratio"] >= 2.0,
        "native <= 32 B per entry at 1M/64 (RSS)": nat["bytes_per_entry_rss"] <= 32,
        "native Router.route <= 0.5x dynamo hash+find_matches (both on int lists)": nat["route_ratio"] <= 0.5,
        "native Router.route <= 0.5x dynamo hash+find_matches (ours on uint32 arrays, dynamo on lists)":
            nat["route_u32_ratio"] <= 0.5,
    }
    if a.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{n:,} (block, worker) entries, {WORKERS} workers, {PROMPT_TOKENS}-token prompts, block {BS}; "
          f"medians of {a.reps} interleaved reps, ratio = median of per-rep ratios vs dynamo")
    print(f"{'':34}{'native':>11}{'ratio':>7}{'python':>11}{'ratio':>7}{'dynamo':>11}   target (native)")
    rows = [("hash+match per prompt (us)", "hash_match_us", "hash_match_ratio", "hash_match_us", "<= 0.5"),
            ("hash only per prompt (us)", "hash_only_us", "hash_only_ratio", "hash_only_us", ""),
            ("store from events (blocks/s)", "store_blocks_per_s", "store_ratio", "store_blocks_per_s", ">= 2.0"),
            ("  steady churn at 1M (stored/s)", "churn_blocks_per_s", "churn_ratio", "churn_blocks_per_s", "(info)"),
            ("bytes per entry, RSS", "bytes_per_entry_rss", "bytes_ratio", "bytes_per_entry_rss", "<= 32 B"),
            ("Router.route (us) vs dyn hash+match", "route_us", "route_ratio", "hash_match_us", "<= 0.5"),
            ("  same, our prompts as uint32 arrays", "route_u32_us", "route_u32_ratio", "hash_match_us", "<= 0.5")]
    for label, key, rkey, dkey, target in rows:
        nv, pv, dv = summary["native"][key], summary["python"][key], summary["dynamo"][dkey]
        fmt = (lambda v: f"{v:11,.0f}") if "blocks_per_s" in key else (lambda v: f"{v:11.1f}")
        print(f"{label:34}{fmt(nv)}{summary['native'][rkey]:7.2f}{fmt(pv)}{summary['python'][rkey]:7.2f}{fmt(dv)}   {target}")
    print(f"{'bytes per entry, core estimate':34}{summary['native']['bytes_per_entry_estimate']:11.1f}{'':7}"
          f"{summary['python']['bytes_per_entry_estimate']:11.1f}")
    for side, b in summary["big"].items():
        print(f"at scale: {side}: {b['entries']:,} entries, {b['workers']} workers: {b['bytes_per_entry_rss']:.1f} B per entry (RSS)")
    for k, v in summary["targets_met"].items():
        print(f"  {'met   ' if v else 'MISSED'} {k}")
    print(f"load average {summary['loadavg']:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
