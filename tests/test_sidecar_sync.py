"""The sidecar's replica-sync and approximate-mode wiring, in process: config validation, approximate
mode for workers without events and for stale streams, /health degraded while the channel is down."""
from __future__ import annotations

import os
import sys

import pytest
import zmq

from kvroute.sidecar.config import SidecarConfig
from kvroute.sidecar.errors import ConfigError
from kvroute.sidecar.server import SidecarServer
from kvroute.sidecar.service import health
from kvroute.router import Router
from kvroute.sync import MemoryBus, ReplicaSync, SyncRunner

sys.path.insert(0, os.path.dirname(__file__))
from fake_engine import FakeEngine  # noqa: E402


@pytest.mark.parametrize("bad", [{"approximate": "sometimes"}, {"sync_url": "nats://x:4222"}, {"sync_lease_s": 0},
                                 {"sync_heartbeat_s": 5.0, "sync_lease_s": 3.0}, {"approx_ttl_s": -1}])
def test_bad_sync_config(bad):
    with pytest.raises(ConfigError):
        SidecarConfig.from_dict(bad)


def test_approximate_auto_for_workers_without_events_and_stale_streams(tmp_path):
    ctx = zmq.Context()
    eng = FakeEngine(ctx, block_size=16)
    cfg = SidecarConfig.from_dict({"bind": "tcp://127.0.0.1:*", "http_port": 0, "block_size": 16, "workers": [
        {"id": "ev", "endpoint": eng.endpoint, "replay_endpoint": eng.replay_endpoint}, {"id": "blind"}]})
    srv = SidecarServer(cfg, context=ctx).start()
    try:
        r = srv.router
        assert r.approximate_workers() == ["blind"]
        # routed twice to the blind worker's predicted cache: the second decision predicts the first's prefix
        r.mark_unhealthy("ev")
        toks = list(range(64))
        r.route(toks, request_id=1)
        r.finish(1)
        assert r.route(toks, request_id=2).predicted_cached_tokens == 64
        r.mark_unhealthy("ev", False)
        # a stale stream is predicted until fresh events rebuild it
        srv.events.stale_workers = lambda: {"ev"}
        srv.refresh_approximate()
        assert sorted(r.approximate_workers()) == ["blind", "ev"]
        srv.events.stale_workers = lambda: set()
        srv.refresh_approximate()
        assert r.approximate_workers() == ["blind"]
    finally:
        srv.close()
        eng.close()
        ctx.destroy(linger=0)


def test_approximate_off_and_all():
    for mode, want in (("off", []), ("all", ["a", "b"])):
        cfg = SidecarConfig.from_dict({"bind": "tcp://127.0.0.1:*", "http_port": 0, "approximate": mode,
                                       "workers": [{"id": "a"}, {"id": "b"}]})
        srv = SidecarServer(cfg, context=zmq.Context()).start()
        try:
            assert sorted(srv.router.approximate_workers()) == want
        finally:
            srv.close()


def test_health_degraded_with_reason_while_sync_is_down():
    bus = MemoryBus()
    r = Router(["w0"], 16)
    runner = SyncRunner(ReplicaSync(r, "a"), bus.transport(), poll_s=0.01, catch_up_s=0.1, retry_s=0.01).start()
    try:
        h = health(r, None, runner)
        assert h["status"] == "ok" and h["sync"]["connected"] and h["reasons"] == {}
        bus.down = True
        for _ in range(500):
            if not runner.connected:
                break
            runner._stop.wait(0.01)
        h = health(r, None, runner)
        assert h["status"] == "degraded" and "replica sync unreachable" in h["reasons"]["replica_sync"][0]
        bus.down = False
        for _ in range(500):
            if runner.connected:
                break
            runner._stop.wait(0.01)
        assert health(r, None, runner)["status"] == "ok"
    finally:
        runner.close()
