"""Real servers: a Redis server, three ``kvroute serve`` replicas sharing it, fake vLLM-like engines.

One fleet for the module, scenarios in order: a 1,000-request burst spread over the replicas (every
replica's per-worker load equals the truth), a restart of the sync server (degraded, routing alone,
resync), ``kill -9`` of a replica (its load expires on the others by its lease; its restart catches up
before it answers).  No sleeps decide an outcome: the tests poll the replicas' stats with deadlines.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request

import numpy as np
import pytest
import zmq

from kvroute.sidecar import KVRouteClient
from kvroute.sidecar.process import spawn_serve

sys.path.insert(0, os.path.dirname(__file__))
from fake_engine import FakeEngine  # noqa: E402
from sync_server import RedisProcess, stream_key  # noqa: E402

BS = 16
LEASE_S = 1.0
pytestmark = pytest.mark.timeout(120)


def toks(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50_000, n).tolist()


class Fleet:
    def __init__(self, tmp_path) -> None:
        self.redis = RedisProcess().start()
        self.ctx = zmq.Context()
        self.engines = {f"w{i}": FakeEngine(self.ctx, block_size=BS, capacity=4096, seed=i) for i in range(3)}
        self.key = stream_key()
        self.tmp = tmp_path
        self.procs: dict[str, object] = {}
        self.clients: dict[str, KVRouteClient] = {}
        self.ready: dict[str, dict] = {}

    def config(self, name: str) -> str:
        cfg = {
            "bind": "tcp://127.0.0.1:*", "http_port": -1, "block_size": BS, "request_ttl_s": 600,
            "sync_url": self.redis.url, "sync_stream": self.key, "replica_name": name,
            "sync_lease_s": LEASE_S, "sync_heartbeat_s": 0.2, "sync_catch_up_s": 3.0,
            "workers": [{"id": w, "endpoint": e.endpoint, "replay_endpoint": e.replay_endpoint}
                        for w, e in self.engines.items()],
        }
        p = self.tmp / f"{name}.json"
        p.write_text(json.dumps(cfg))
        return str(p)

    def start(self, name: str) -> dict:
        proc, ready = spawn_serve(self.config(name), timeout_s=60)
        self.procs[name] = proc
        self.ready[name] = ready
        self.clients[name] = KVRouteClient(ready["address"], timeout_s=10, context=self.ctx)
        return ready

    def loads(self, name: str) -> dict:
        st = self.clients[name].stats()
        return {w["worker"]: (w["active_requests"], w["decode_blocks"], w["prefill_tokens"]) for w in st["workers"]}

    def wait_consistent(self, truth: dict, names, timeout_s: float = 15.0) -> float:
        t0 = time.monotonic()
        while True:
            got = {n: self.loads(n) for n in names}
            if all(g == truth for g in got.values()):
                return time.monotonic() - t0
            assert time.monotonic() - t0 < timeout_s, f"replicas disagree with the truth {truth}: {got}"
            time.sleep(0.01)

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except Exception:
                    p.kill()
        for e in self.engines.values():
            e.close()
        self.ctx.destroy(linger=0)
        self.redis.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("replicas"))
    try:
        for n in ("r0", "r1", "r2"):
            f.start(n)
        yield f
    finally:
        f.close()


def truth_of(flights: dict) -> dict:
    out = {w: [0, 0, 0] for w in ("w0", "w1", "w2")}
    for w, blocks, pt, open_ in flights.values():
        out[w][0] += 1
        out[w][1] += blocks
        out[w][2] += pt if open_ else 0
    return {w: tuple(v) for w, v in out.items()}


def test_burst_spread_over_replicas_load_consistent(fleet):
    names = ["r0", "r1", "r2"]
    prefixes = [toks(10 + i, 256) for i in range(8)]
    flights = {}
    for i in range(1000):
        name = names[i % 3]
        p = prefixes[i % 8] + toks(1000 + i, 40)
        d = fleet.clients[name].route(p, request_id=i, costs=False)
        flights[i] = (d["worker"], len(p) // BS, len(p) - d["predicted_cached_tokens"], True)
        if i % 50 == 0:  # engines cache what they serve; their events reach every replica
            fleet.engines[d["worker"]].request(p)
            fleet.engines[d["worker"]].publish()
        if i % 3 == 0:
            fleet.clients[name].prefill_done(i)
            flights[i] = flights[i][:3] + (False,)
    lag = fleet.wait_consistent(truth_of(flights), names)
    sy = [fleet.clients[n].stats()["sync"] for n in names]
    mean = sum(x["delay_seconds_sum"] for x in sy) / max(1, sum(x["delay_seconds_count"] for x in sy))
    print(f"burst of 1000 over 3 replicas: consistent {lag * 1000:.1f} ms after the last decision; sync delay "
          f"(publish to apply) mean {mean * 1000:.2f} ms, max {max(x['delay_seconds_max'] for x in sy) * 1000:.1f} ms")
    assert all(x["duplicate_routes"] == 0 if "duplicate_routes" in x else True for x in sy)
    for i in range(0, 1000, 2):
        fleet.clients[names[i % 3]].finish(i)
        del flights[i]
    fleet.wait_consistent(truth_of(flights), names)
    for i in list(flights):
        fleet.clients[names[i % 3]].finish(i)
    fleet.wait_consistent(truth_of({}), names)
    for n in names:
        h = fleet.clients[n].health()
        assert h["status"] == "ok" and h["sync"]["connected"] and h["sync"]["peers"] == 2, h
    text = urllib.request.urlopen(f"http://127.0.0.1:{fleet.ready['r0']['http_port']}/metrics", timeout=10).read().decode()
    for series in ("kvroute_sync_connected 1.0", "kvroute_sync_peers 2.0", "kvroute_sync_batches_in ",
                   "kvroute_sync_remote_in_flight 0.0"):
        assert series in text, series


def test_sync_server_restart_degrades_then_resyncs(fleet):
    names = ["r0", "r1", "r2"]
    flights = {}
    for i in range(30):
        d = fleet.clients[names[i % 3]].route(toks(5000 + i, 64), request_id=f"a{i}", costs=False)
        flights[f"a{i}"] = (d["worker"], 4, 64 - d["predicted_cached_tokens"], True)
    fleet.wait_consistent(truth_of(flights), names)
    fleet.redis.stop()
    deadline = time.monotonic() + 15
    while True:
        hs = [fleet.clients[n].health() for n in names]
        if all(h["status"] == "degraded" for h in hs):
            break
        assert time.monotonic() < deadline, hs
        time.sleep(0.02)
    assert all(any("replica sync unreachable" in r for r in h["reasons"].get("replica_sync", [])) for h in hs)
    # routing alone: each replica still answers, and counts its own load only
    for i in range(30, 36):
        d = fleet.clients[names[i % 3]].route(toks(5000 + i, 64), request_id=f"a{i}", costs=False)
        flights[f"a{i}"] = (d["worker"], 4, 64 - d["predicted_cached_tokens"], True)
    fleet.redis.start()
    fleet.wait_consistent(truth_of(flights), names, timeout_s=20)
    for n in names:
        assert fleet.clients[n].health()["status"] == "ok"
    for i, rid in enumerate(flights):
        fleet.clients[names[int(rid[1:]) % 3]].finish(rid)
    fleet.wait_consistent(truth_of({}), names)


def test_kill_9_replica_load_expires_and_restart_catches_up(fleet):
    flights = {}
    for i in range(40):
        name = ["r0", "r1", "r2"][i % 3]
        d = fleet.clients[name].route(toks(9000 + i, 80), request_id=f"k{i}", costs=False)
        flights[f"k{i}"] = (d["worker"], 5, 80 - d["predicted_cached_tokens"], True, name)
    truth = truth_of({k: v[:4] for k, v in flights.items()})
    fleet.wait_consistent(truth, ["r0", "r1", "r2"])
    fleet.procs["r2"].send_signal(signal.SIGKILL)
    fleet.procs["r2"].wait(10)
    t0 = time.monotonic()
    survivors = {k: v[:4] for k, v in flights.items() if v[4] != "r2"}
    fleet.wait_consistent(truth_of(survivors), ["r0", "r1"], timeout_s=LEASE_S + 10)
    print(f"SIGKILLed replica's load released {time.monotonic() - t0:.2f} s after the kill (lease {LEASE_S} s)")
    fleet.clients["r2"].close()
    ready = fleet.start("r2")  # a new incarnation: catches up before printing ready
    assert ready["sync"]["caught_up"] and ready["sync"]["peers"] == 2, ready
    assert fleet.loads("r2") == truth_of(survivors)
    for k, v in flights.items():
        if v[4] != "r2":
            fleet.clients[v[4]].finish(k)
    fleet.wait_consistent(truth_of({}), ["r0", "r1", "r2"])
