#!/usr/bin/env python3
"""What replica sync costs a decision: one router alone vs the same router with kvroute.sync over Redis.

    python bench/sync_cost.py [--sync-url redis://127.0.0.1:6379/0] [--n 3000] [--workers 16]

Workload: 16 workers, 8,192-token prompts at block size 16 behind 16 shared
4,096-token system prompts (each decision speculates its whole 512-block chain,
so every route message carries 4 KiB of hashes); a ``finish`` follows each
decision.  A second replica on the same stream applies everything.  Reported
per setup, interleaved twice (the machine is shared):

* decision wall time p50 / p99 in the routing thread (what a client waits for,
  minus the socket);
* CPU of the routing thread per decision (``Router.route`` + the observer's
  enqueue: what sync adds to the decision itself);
* CPU of the whole process per decision (adds the publisher and reader
  threads of *both* replicas, which share the process: an upper bound of what
  sync costs one replica's throughput).

Needs a Redis server (``--sync-url``; default: a private ``redis-server`` on a free port).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

import numpy as np

from kvroute.router import Router
from kvroute.sync import ReplicaSync, SyncRunner
from kvroute.sync.redis_transport import RedisTransport


def queries(n_sys: int = 16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sysp = [rng.integers(0, 128000, 4096, dtype=np.uint32) for _ in range(n_sys)]
    return [np.concatenate([sysp[i % n_sys], rng.integers(0, 128000, 4096, dtype=np.uint32)]) for i in range(400)]


def run(url: str | None, qs, n: int, workers: int) -> dict:
    ws = [f"w{i}" for i in range(workers)]
    r, peer = Router(ws, 16, request_ttl_s=600), Router(ws, 16, request_ttl_s=600)
    runners = []
    if url:
        key = f"kvroute:bench:{uuid.uuid4().hex}"
        for rr, name in ((r, "a"), (peer, "b")):
            runners.append(SyncRunner(ReplicaSync(rr, name), RedisTransport(url, stream=key)).start())
    wall, cpu = [], []
    p0 = time.process_time()
    for i in range(n):
        q = qs[i % len(qs)]
        c0 = time.thread_time()
        t0 = time.perf_counter()
        r.route(q, request_id=i)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
        r.finish(i)
        time.sleep(0.0005)  # an open gap between decisions, as from a client
    if runners:  # let the threads finish what the decisions queued, inside the CPU measurement
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (runners[0].sync.has_output()
                                               or peer.stats()["remote_in_flight"] or runners[1].sync.has_output()):
            time.sleep(0.01)
    proc_cpu = time.process_time() - p0
    for x in runners:
        x.close()
    return {"wall_p50_ms": np.percentile(wall, 50) * 1e3, "wall_p99_ms": np.percentile(wall, 99) * 1e3,
            "thread_cpu_p50_us": np.percentile(cpu, 50) * 1e6, "thread_cpu_p99_us": np.percentile(cpu, 99) * 1e6,
            "process_cpu_per_decision_us": proc_cpu / n * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sync-url", default="")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=16)
    a = ap.parse_args()
    from redis_server import private_redis

    qs = queries()
    la = os.getloadavg()[0]
    rows: dict[str, list[dict]] = {"alone": [], "redis sync": []}
    with private_redis(a.sync_url or None) as url:
        for _ in range(2):
            for name, u in (("alone", None), ("redis sync", url)):
                rows[name].append(run(u, qs, a.n, a.workers))
    print(f"{a.n} decisions x 2 runs per setup, {a.workers} workers, 8,192-token prompts, block 16")
    print("| setup | wall p50 ms | wall p99 ms | routing-thread CPU p50 / p99 us | process CPU per decision us |")
    print("|---|---|---|---|---|")
    for name, rs in rows.items():
        for x in rs:
            print(f"| {name} | {x['wall_p50_ms']:.3f} | {x['wall_p99_ms']:.3f} | {x['thread_cpu_p50_us']:.0f} / "
                  f"{x['thread_cpu_p99_us']:.0f} | {x['process_cpu_per_decision_us']:.0f} |")
    med = {k: {f: float(np.median([x[f] for x in v])) for f in v[0]} for k, v in rows.items()}
    d = {f: med["redis sync"][f] - med["alone"][f] for f in med["alone"]}
    print(f"sync adds (medians of runs): wall p50 {d['wall_p50_ms']:+.3f} ms, p99 {d['wall_p99_ms']:+.3f} ms; "
          f"routing-thread CPU p50 {d['thread_cpu_p50_us']:+.0f} us; process CPU {d['process_cpu_per_decision_us']:+.0f} us "
          f"per decision")
    print(f"load average {la:.2f} -> {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
