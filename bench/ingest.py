"""KV-event ingestion throughput: kvroute vs the Dynamo path, on the same real frames.

Workload (defaults): 64 workers, each serving 8,192-token prompts (block size
16 = 512 blocks) that start with one of 32 shared prefixes (1/8 to 3/4 of it)
and end with a unique tail, with an LRU cache of 2,048 blocks per worker
that, like vLLM's free queue, evicts a finished prompt's tail before its head;
so batches carry both ``BlockStored`` (the uncached part of each prompt) and
``BlockRemoved`` (evictions).  Every batch is encoded in vLLM 0.33's wire
format and framed as vLLM sends it: ``[topic, seq (8B BE), payload]``.

Measured paths, each repeated ``--repeats`` times on a fresh index, the paths
interleaved; medians of wall time and of this process's CPU time (all threads;
the fair "one core" figure on a shared machine).  ``kvroute_zmq``'s CPU time
is the subscriber process only (the publisher is another process).

* ``kvroute``       -- ``kvroute.adapters.vllm.decode`` (the Python decoder, msgpack ->
  dataclasses) + ``KVIndex.apply`` per frame.
* ``kvroute_packed`` -- ``kvroute.adapters.vllm.decode_packed`` + ``KVIndex.apply``: with the
  compiled core, the payload is parsed in C++ straight into index operations (one parse call and
  one apply call per frame); what the subscriber runs.  Same as ``kvroute`` on the Python backend.
* ``kvroute_zmq``   -- the same frames sent by a publisher *process* over 64
  loopback PUB sockets into one ``KVEventSubscriber`` (sequence checks, dedup
  digests, lock, metrics included); time from the first send to the last apply.
* ``dynamo``        -- the Dynamo path from Python (ai-dynamo-runtime 1.6.1):
  ``msgpack.unpackb`` + ``compute_block_hash_for_seq`` per stored event +
  JSON event + ``RadixTree.apply_event`` (the format of BRIEF section 4).
* ``dynamo_apply_only`` -- ``RadixTree.apply_event`` alone on pre-built JSON
  (context: the Rust tree's own speed, excluding the decode/hash work that
  the two full paths both do).

Blocks counted = stored + removed block entries in the frames.  A cross-check
compares each index with the generator's true caches (overlap of sample
prompts; for kvroute also every worker's full block set).  By default every
worker names a block by the same engine hash (vLLM with a fixed
PYTHONHASHSEED), which Dynamo's tree needs; ``--per-worker-hashes`` shows what
happens when they differ (Dynamo's removals then fail and its overlaps go wrong;
kvroute keys on its own content hash and stays exact).

Usage: ``python bench/ingest.py [--workers 64] [--requests 16] [--repeats 5] [--per-worker-hashes] [--json]``
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from collections import OrderedDict

import msgpack
import numpy as np

os.environ.setdefault("DYN_LOG", "error")  # Dynamo's Rust logger: no per-block warnings on stderr
import xxhash

from kvroute.adapters.vllm import decode, decode_packed, encode
from kvroute.kvindex import BlockRemoved, BlockStored, EventBatch, KVIndex, Tier, block_hash_list


# ------------------------------------------------------------------ workload
def make_workload(n_workers: int, n_requests: int, prompt_tokens: int, block_size: int, capacity: int,
                  n_prefixes: int, seed: int, per_worker_hashes: bool = False):
    """Per worker: a list of (seq, payload) frames; sample prompts and each worker's final
    cache (content hashes) for the cross-check; block counts."""
    rng = np.random.default_rng(seed)
    rnd = random.Random(seed)
    prompt_blocks = prompt_tokens // block_size
    prefixes = [rng.integers(0, 32_000, block_size * rnd.randrange(max(1, prompt_blocks // 8), max(2, prompt_blocks * 3 // 4))).tolist()
                for _ in range(n_prefixes)]
    frames: list[list[tuple[int, bytes]]] = []
    samples: list[list[int]] = []
    truth: list[set[int]] = []  # per worker: content hashes it holds at the end
    n_stored = n_removed = 0
    for w in range(n_workers):
        lru: OrderedDict[int, None] = OrderedDict()
        ehash = {}  # content -> engine hash
        salt = w + 1 if per_worker_hashes else 0  # vLLM: same hashes fleet-wide only if PYTHONHASHSEED is fixed
        out = []
        for seq in range(n_requests):
            pre = rnd.choice(prefixes)
            tokens = pre + rng.integers(0, 32_000, max(0, prompt_tokens - len(pre))).tolist()
            hs = block_hash_list(tokens, block_size)
            hit = 0
            for c in hs:
                if c not in lru:
                    break
                hit += 1
            new = hs[hit:]
            protect = set(hs)
            evicted = []
            while len(lru) + len(new) > capacity:
                victim = next(c for c in lru if c not in protect)
                del lru[victim]
                evicted.append(victim)
            events = []
            if evicted:
                events.append(BlockRemoved(tuple(ehash.pop(c) for c in evicted), Tier.GPU))
            for c in new:
                ehash[c] = xxhash.xxh3_64_intdigest(c.to_bytes(8, "little"), seed=salt)
            for c in reversed(hs):  # vLLM frees a finished request's blocks tail first: the head stays newest
                lru[c] = None
                lru.move_to_end(c)
            parent = ehash[hs[hit - 1]] if hit else None
            events.append(BlockStored(tuple(ehash[c] for c in new), parent,
                                      tuple(tokens[hit * block_size: len(hs) * block_size]), block_size, Tier.GPU))
            n_removed += len(evicted)
            n_stored += len(new)
            out.append((seq, encode(EventBatch(1_700_000_000.0 + seq, tuple(events), 0))))
            if seq >= n_requests - 2 and w % 4 == 0:
                samples.append(tokens)
        frames.append(out)
        truth.append(set(lru))
    return frames, samples, truth, n_stored, n_removed


# --------------------------------------------------------------------- paths
def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all its threads) since ``t0``."""
    return time.perf_counter() - t0[0], time.process_time() - t0[1]


def run_kvroute(frames, block_size, dec=decode):
    ix = KVIndex(block_size)
    t0 = _now()
    for w, wf in enumerate(frames):
        for _, payload in wf:
            ix.apply(w, dec(payload))
    return _since(t0), ix


def run_kvroute_packed(frames, block_size):
    return run_kvroute(frames, block_size, decode_packed)


def run_kvroute_interleaved(frames, block_size):
    """Same as run_kvroute, frames interleaved across workers as they arrive in practice."""
    ix = KVIndex(block_size)
    order = [(w, p) for i in range(max(map(len, frames))) for w, wf in enumerate(frames) if i < len(wf) for p in [wf[i][1]]]
    t0 = _now()
    for w, payload in order:
        ix.apply(w, decode(payload))
    return _since(t0), ix


def _dynamo_event(seq, ev, block_size, compute):
    if isinstance(ev, dict):
        kind = ev.get("type")
        if kind == "BlockStored":
            local = compute(ev["token_ids"], block_size)
            data = {"stored": {"parent_hash": ev.get("parent_block_hash"),
                               "blocks": [{"block_hash": h, "tokens_hash": l} for h, l in zip(ev["block_hashes"], local)]}}
        elif kind == "BlockRemoved":
            data = {"removed": {"block_hashes": ev["block_hashes"]}}
        else:
            data = "cleared"
        return json.dumps({"event_id": seq, "dp_rank": 0, "data": data}).encode()
    raise ValueError("unexpected event")


def _apply_dynamo(tree, w, js):
    try:
        tree.apply_event(w, js)
    except RuntimeError:
        # Dynamo's tree drops a worker's whole subtree when a parent is removed, so the
        # later removal of an evicted child reports "Failed to find block" (after
        # applying the rest of the event); vLLM evicts parents before children all the time
        pass


def run_dynamo(frames, block_size):
    from dynamo._core import RadixTree, compute_block_hash_for_seq

    tree = RadixTree()
    t0 = _now()
    for w, wf in enumerate(frames):
        for seq, payload in wf:
            batch = msgpack.unpackb(payload)
            for ev in batch[1]:
                _apply_dynamo(tree, w, _dynamo_event(seq, ev, block_size, compute_block_hash_for_seq))
    return _since(t0), tree


def run_dynamo_apply_only(frames, block_size):
    from dynamo._core import RadixTree, compute_block_hash_for_seq

    pre = []
    for w, wf in enumerate(frames):
        for seq, payload in wf:
            for ev in msgpack.unpackb(payload)[1]:
                pre.append((w, _dynamo_event(seq, ev, block_size, compute_block_hash_for_seq)))
    tree = RadixTree()
    t0 = _now()
    for w, js in pre:
        _apply_dynamo(tree, w, js)
    return _since(t0), tree


def _publisher(frames, conn):
    import zmq

    ctx = zmq.Context()
    socks = []
    for _ in frames:
        s = ctx.socket(zmq.XPUB)
        s.setsockopt(zmq.SNDHWM, 0)
        port = s.bind_to_random_port("tcp://127.0.0.1")
        socks.append((s, port))
    conn.send([p for _, p in socks])
    for s, _ in socks:  # wait for the subscriber's subscription on every socket
        while s.recv()[:1] != b"\x01":
            pass
    conn.send("ready")
    conn.recv()  # go
    n = max(map(len, frames))
    for i in range(n):
        for (s, _), wf in zip(socks, frames):
            if i < len(wf):
                seq, payload = wf[i]
                s.send_multipart([b"", seq.to_bytes(8, "big"), payload], copy=False)
    conn.recv()  # done
    for s, _ in socks:
        s.close(linger=0)
    ctx.term()


def run_kvroute_zmq(frames, block_size):
    from kvroute.adapters.subscriber import KVEventSubscriber, SubscriberConfig

    total = sum(map(len, frames))
    parent, child = mp.Pipe()
    proc = mp.get_context("fork").Process(target=_publisher, args=(frames, child), daemon=True)
    proc.start()
    ports = parent.recv()
    ix = KVIndex(block_size)
    sub = KVEventSubscriber(ix, config=SubscriberConfig(rcvhwm=0))
    try:
        for w, port in enumerate(ports):
            sub.add_worker(w, f"tcp://127.0.0.1:{port}")
        while not parent.poll(0):
            sub.poll(10)
        assert parent.recv() == "ready"
        parent.send("go")
        t0 = _now()
        while sub.metrics()["batches"] + sum(sub.metrics()["decode_errors"].values()) < total:
            sub.poll(100)
        dt = _since(t0)
        m = sub.metrics()
        parent.send("done")
    finally:
        proc.join(10)
        sub.close()
    return dt, ix, m


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--requests", type=int, default=16, help="prompts per worker")
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--capacity", type=int, default=2048, help="cached blocks per worker")
    ap.add_argument("--prefixes", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-zmq", action="store_true", help="skip the loopback ZMQ run")
    ap.add_argument("--per-worker-hashes", action="store_true",
                    help="engine hashes differ per worker (vLLM without a fixed PYTHONHASHSEED); default: shared")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = ap.parse_args(argv)

    t0 = time.perf_counter()
    frames, samples, truth, n_stored, n_removed = make_workload(a.workers, a.requests, a.prompt_tokens, a.block_size,
                                                         a.capacity, a.prefixes, a.seed, a.per_worker_hashes)
    blocks = n_stored + n_removed
    n_frames = sum(map(len, frames))
    n_bytes = sum(len(p) for wf in frames for _, p in wf)
    gen_s = time.perf_counter() - t0

    paths = {"kvroute": run_kvroute, "kvroute_packed": run_kvroute_packed, "kvroute_interleaved": run_kvroute_interleaved}
    try:
        import dynamo._core  # noqa: F401

        paths["dynamo"] = run_dynamo
        paths["dynamo_apply_only"] = run_dynamo_apply_only
        dynamo_error = None
    except Exception as exc:  # report, do not fail: the comparison needs the optional package
        dynamo_error = f"{type(exc).__name__}: {exc}"
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in paths}
    last: dict[str, object] = {}
    for _ in range(a.repeats):
        for name, fn in paths.items():  # alternate paths so machine drift hits all alike
            dt, idx = fn(frames, a.block_size)
            times[name].append(dt)
            last[name] = idx
    zmq_info = None
    if not a.no_zmq:
        zt = []
        for _ in range(max(1, a.repeats // 2)):
            dt, ix_z, m = run_kvroute_zmq(frames, a.block_size)
            zt.append(dt)
        times["kvroute_zmq"] = zt
        zmq_info = {k: m[k] for k in ("batches", "gaps", "resyncs", "decode_errors", "dropped_frames", "orphans")}
        zmq_info["same_index_as_in_process"] = all(
            ix_z.blocks_of(w) == last["kvroute"].blocks_of(w) for w in range(a.workers))

    res = {}
    for name, ts in times.items():
        wall = statistics.median(t[0] for t in ts)
        cpu = statistics.median(t[1] for t in ts)
        res[name] = {"median_wall_s": wall, "median_cpu_s": cpu, "blocks_per_s_wall": blocks / wall,
                     "blocks_per_s_cpu": blocks / cpu if cpu > 0 else None,
                     "runs_wall_s": [round(t[0], 4) for t in ts], "runs_cpu_s": [round(t[1], 4) for t in ts]}
    # cross-check: per sample prompt, each worker's true overlap (contiguous prefix it holds)
    exact = {}
    true_overlaps = []
    for toks in samples:
        hs = block_hash_list(toks, a.block_size)
        ov = {}
        for w, held in enumerate(truth):
            n = 0
            while n < len(hs) and hs[n] in held:
                n += 1
            if n:
                ov[w] = n
        true_overlaps.append(ov)
    ix = last["kvroute"]
    exact["kvroute_index_equals_truth"] = all(set(ix.blocks_of(w)) == truth[w] for w in range(a.workers))
    exact["kvroute_overlaps_exact"] = all(
        {w: o.total for w, o in ix.match_tokens(t).items()} == ov for t, ov in zip(samples, true_overlaps))
    exact["kvroute_packed_index_equals_truth"] = all(
        set(last["kvroute_packed"].blocks_of(w)) == truth[w] for w in range(a.workers))
    if "dynamo" in last:
        from dynamo._core import compute_block_hash_for_seq

        tree = last["dynamo"]
        wrong = 0
        for t, ov in zip(samples, true_overlaps):
            theirs = {w: n for (w, _r), n in tree.find_matches(compute_block_hash_for_seq(t, a.block_size)).scores.items()}
            wrong += theirs != ov
        exact["dynamo_overlaps_exact"] = wrong == 0
        exact["dynamo_wrong_prompts"] = wrong
    exact["sample_prompts"] = len(samples)
    out = {
        "workload": {"workers": a.workers, "requests_per_worker": a.requests, "prompt_tokens": a.prompt_tokens,
                     "block_size": a.block_size, "capacity_blocks": a.capacity, "frames": n_frames,
                     "engine_hashes": "per-worker" if a.per_worker_hashes else "shared",
                     "payload_mib": round(n_bytes / 2**20, 1), "blocks_stored": n_stored, "blocks_removed": n_removed,
                     "generation_s": round(gen_s, 2)},
        "results": res,
        "ratio_vs_dynamo_cpu": (res["dynamo"]["median_cpu_s"] / res["kvroute"]["median_cpu_s"]) if "dynamo" in res else None,
        "ratio_vs_dynamo_wall": (res["dynamo"]["median_wall_s"] / res["kvroute"]["median_wall_s"]) if "dynamo" in res else None,
        "packed_ratio_vs_dynamo_cpu": (res["dynamo"]["median_cpu_s"] / res["kvroute_packed"]["median_cpu_s"]) if "dynamo" in res else None,
        "backend": KVIndex(1).backend,
        "exactness": exact,
        "dynamo_error": dynamo_error,
        "zmq": zmq_info,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
    }
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    wl = out["workload"]
    print(f"frames {wl['frames']} ({wl['payload_mib']} MiB), blocks stored {n_stored:,} removed {n_removed:,}; "
          f"{a.workers} workers, {a.prompt_tokens}-token prompts, block {a.block_size}")
    print(f"{'path':<22}{'wall s':>9}{'cpu s':>9}{'blocks/s (wall)':>17}{'blocks/s (cpu)':>16}")
    for name, r in res.items():
        cpu_rate = f"{r['blocks_per_s_cpu']:>16,.0f}" if r["blocks_per_s_cpu"] else f"{'-':>16}"
        print(f"{name:<22}{r['median_wall_s']:>9.4f}{r['median_cpu_s']:>9.4f}{r['blocks_per_s_wall']:>17,.0f}{cpu_rate}")
    if out["ratio_vs_dynamo_cpu"] is not None:
        print(f"kvroute / dynamo speed: {out['ratio_vs_dynamo_cpu']:.2f}x by CPU time, {out['ratio_vs_dynamo_wall']:.2f}x by wall time")
        print(f"kvroute_packed / dynamo speed: {out['packed_ratio_vs_dynamo_cpu']:.2f}x by CPU time (backend {out['backend']})")
    else:
        print(f"dynamo path unavailable: {dynamo_error}")
    print(f"exactness vs the generator's true caches: {exact}")
    if zmq_info:
        print(f"zmq run: {zmq_info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
