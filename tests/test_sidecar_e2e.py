"""End to end: ``kvroute serve`` as a real subprocess, fake engines publishing real vLLM-format
KV events over ZMQ, and a client routing a shared-prefix workload.

Nothing sleeps: the test waits on the sidecar's stdout with ``select`` timeouts and on
engine sockets with poll timeouts (``FakeEngine.serve_replay``) between status queries.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import zmq

from kvroute.sidecar import BadRequestError, KVRouteClient

sys.path.insert(0, os.path.dirname(__file__))
from fake_engine import FakeEngine  # noqa: E402

from kvroute.sidecar.process import spawn_serve  # noqa: E402

BS = 16
pytestmark = pytest.mark.timeout(180)


def toks(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50_000, n).tolist()


def start_sidecar(cfg_path: str) -> tuple[subprocess.Popen, dict]:
    return spawn_serve(cfg_path, timeout_s=60)


def stop_sidecar(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()


def wait_applied(client: KVRouteClient, engines: dict[str, FakeEngine], timeout_s: float = 20.0) -> dict:
    """Query the sidecar until every engine's last published batch is applied (poll-paced, no sleep)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = client.stats()
        ws = st["events"]["workers"]
        if all(ws.get(w, {}).get("next_seq", 0) >= e.seq for w, e in engines.items()):
            return st
        assert time.monotonic() < deadline, f"events not applied: {ws}"
        for e in engines.values():
            e.serve_replay(timeout_ms=10)  # pace the loop on a real socket (and answer replays)


@pytest.fixture
def fleet(tmp_path):
    ctx = zmq.Context()
    engines = {f"w{i}": FakeEngine(ctx, block_size=BS, capacity=4096, seed=i) for i in range(3)}
    cfg = {
        "bind": "tcp://127.0.0.1:*", "http_port": -1, "block_size": BS, "snapshot": str(tmp_path / "index.snap"),
        "workers": [{"id": w, "endpoint": e.endpoint, "replay_endpoint": e.replay_endpoint} for w, e in engines.items()],
    }
    path = tmp_path / "kvroute.json"
    path.write_text(json.dumps(cfg))
    yield engines, str(path), ctx
    for e in engines.values():
        e.close()
    ctx.destroy(linger=0)  # also closes a client left open by a failed assertion


def test_shared_prefix_workload_routes_to_cache(fleet):
    engines, cfg_path, ctx = fleet
    proc, ready = start_sidecar(cfg_path)
    try:
        for e in engines.values():
            assert e.wait_for_subscribers(1, timeout_ms=20_000)
        client = KVRouteClient(ready["address"], timeout_s=10, context=ctx)
        # each engine warms one system prompt of 256 tokens
        prefixes = {w: toks(10 + i, 256) for i, w in enumerate(engines)}
        for w, e in engines.items():
            e.request(prefixes[w] + toks(99, 40))
            e.publish()
        st = wait_applied(client, engines)
        assert st["index"]["entries"] == 3 * (296 // BS)
        # shared-prefix workload: every request goes where its prefix is cached; predicted == engine's hit
        n = 0
        for _round in range(4):
            for w in engines:
                p = prefixes[w] + toks(1000 + n, 50)
                d = client.route(p, request_id=n)
                assert d["worker"] == w, (d["worker"], w, d["costs"])
                hit_blocks = engines[w].request(p)
                assert d["predicted_cached_tokens"] == hit_blocks * BS >= 256
                engines[w].publish()
                client.prefill_done(n)
                client.finish(n)
                n += 1
            wait_applied(client, engines)
        # a new prefix: its first request lands somewhere; once the engine's events arrive, the rest follow it
        newp = toks(777, 320)
        first = client.route(newp + toks(5000, 20), request_id="new0")["worker"]
        engines[first].request(newp + toks(5000, 20))
        engines[first].publish()
        client.finish("new0")
        wait_applied(client, engines)
        for k in range(1, 5):
            d = client.route(newp + toks(5000 + k, 20), request_id=f"new{k}")
            assert d["worker"] == first and d["predicted_cached_tokens"] >= 320 and d["predicted_pending_tokens"] == 0
            client.finish(f"new{k}")
        # malformed traffic does not stop the server
        with pytest.raises(BadRequestError):
            client.call_raw(b"\xff\xfe")
        assert client.ping()
        health = client.health()
        assert health["status"] == "ok" and health["healthy_workers"] == 3
        text = urllib.request.urlopen(f"http://127.0.0.1:{ready['http_port']}/metrics", timeout=10).read().decode()
        for series in ('kvroute_events_worker_batches{worker="w0"}', "kvroute_events_batches ", "kvroute_events_gaps ", "kvroute_events_lag_seconds_count",
                       'kvroute_decisions_total{worker="w2"}', "kvroute_predicted_hit_ratio", "kvroute_index_entries",
                       "kvroute_decision_latency_seconds_bucket"):
            assert series in text, series
        client.close()
    finally:
        assert stop_sidecar(proc) == 0
    # the snapshot written on SIGTERM is restored by the next process: routing is warm before any event
    proc, ready = start_sidecar(cfg_path)
    try:
        assert ready["restored"] and ready["index_entries"] > 0
        client = KVRouteClient(ready["address"], timeout_s=10, context=ctx)
        w = "w1"
        d = client.route(prefixes[w] + toks(4242, 30), request_id="warm")
        assert d["worker"] == w and d["predicted_cached_tokens"] >= 256
        client.close()
    finally:
        assert stop_sidecar(proc) == 0
