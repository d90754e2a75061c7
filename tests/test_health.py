"""Health that tells the truth (issue 17): blind workers make ``/health`` degraded, with reasons.

A worker whose endpoint never connected, whose event stream stays silent while requests are
routed to it, or whose engine uses another block size: the ``health`` op says ``degraded``
with per-worker reasons, a WARNING is logged once, and the router stops crediting that
worker's cache until the reason clears.  Real ZMQ sockets, an injected clock, no sleeps.
"""
from __future__ import annotations

import logging
import socket
import time

import msgpack
import pytest
import zmq

from kvroute.kvindex import block_hash_list
from kvroute.router import Router
from kvroute.sidecar.events import EventSource
from kvroute.sidecar.health import HealthConfig, HealthMonitor
from kvroute.sidecar.metrics import Metrics
from kvroute.sidecar.service import Service

from fake_engine import FakeEngine
from test_subscriber import FakeClock as Clock


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def setup(ctx, workers, bs=4):
    clock = Clock()
    r = Router(workers, bs, clock=clock)
    ev = EventSource(r.index, r.lock, context=ctx, clock=clock)
    mon = HealthMonitor(r, ev, HealthConfig(silence_s=5.0, connect_grace_s=2.0), clock=clock)
    svc = Service(r, Metrics(r, ev), ev, monitor=mon)
    return clock, r, ev, mon, svc


def call(svc, msg):
    return msgpack.unpackb(svc.handle(msgpack.packb(msg, use_bin_type=True)), raw=False, strict_map_key=False)


def settle(ev, engines=(), until=lambda: True, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while True:
        ev.subscriber.poll(5)
        for e in engines:
            e.serve_replay(0)
        if until():
            return
        assert time.monotonic() < deadline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_never_connected_endpoint_is_reported_and_not_credited(ctx, caplog):
    clock, r, ev, mon, svc = setup(ctx, [])
    try:
        assert call(svc, {"op": "add_worker", "worker": "dead", "endpoint": f"tcp://127.0.0.1:{free_port()}"})["ok"]
        p = list(range(32))
        r.index.store("dead", block_hash_list(p, 4))  # e.g. restored from a snapshot
        settle(ev)
        assert call(svc, {"op": "health"})["result"]["status"] == "ok"  # within the grace period
        clock.t += 2.5
        with caplog.at_level(logging.WARNING, logger="kvroute.sidecar"):
            h = call(svc, {"op": "health"})["result"]
            call(svc, {"op": "health"})
        assert h["status"] == "degraded" and h["reasons"] == {"dead": ["never_connected"]}, h
        warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING and "dead" in rec.getMessage()]
        assert len(warnings) == 1, [rec.getMessage() for rec in caplog.records]  # once, on the transition
        d = call(svc, {"op": "route", "request_id": 1, "token_ids": p})["result"]
        assert d["worker"] == "dead" and d["predicted_cached_tokens"] == 0  # its cache is not credited
    finally:
        ev.close()


def test_a_silent_stream_while_routed_to_is_reported_then_recovers(ctx, caplog):
    eng = FakeEngine(ctx, block_size=4, capacity=64)
    clock, r, ev, mon, svc = setup(ctx, [])
    try:
        assert call(svc, {"op": "add_worker", "worker": "w", "endpoint": eng.endpoint,
                          "replay_endpoint": eng.replay_endpoint})["ok"]
        assert eng.wait_for_subscribers(1, 5000)
        p = list(range(32))
        eng.request(p)
        eng.publish()
        settle(ev, [eng], lambda: ev.subscriber.metrics()["batches"] == 1)
        assert call(svc, {"op": "health"})["result"]["status"] == "ok"
        clock.t += 60  # idle and not routed to: silence is normal
        assert call(svc, {"op": "health"})["result"]["status"] == "ok"
        d = call(svc, {"op": "route", "request_id": 1, "token_ids": p + [1, 2, 3, 4]})["result"]
        assert d["predicted_cached_tokens"] == 32
        clock.t += 4
        assert call(svc, {"op": "health"})["result"]["status"] == "ok"
        clock.t += 2  # routed to 6 s ago, nothing heard since
        h = call(svc, {"op": "health"})["result"]
        assert h["status"] == "degraded" and h["reasons"] == {"w": ["silent"]}, h
        d = call(svc, {"op": "route", "request_id": 2, "token_ids": p + [5, 6, 7, 8]})["result"]
        assert d["predicted_cached_tokens"] == 0
        eng.request(p + [1, 2, 3, 4])  # the engine speaks again
        eng.publish()
        settle(ev, [eng], lambda: ev.subscriber.metrics()["batches"] == 2)
        h = call(svc, {"op": "health"})["result"]
        assert h["status"] == "ok" and h["reasons"] == {}, h
        d = call(svc, {"op": "route", "request_id": 3, "token_ids": p + [9, 9, 9, 9]})["result"]
        assert d["predicted_cached_tokens"] == 32
    finally:
        ev.close()
        eng.close()


def test_a_block_size_mismatch_is_reported(ctx, caplog):
    eng = FakeEngine(ctx, block_size=8, capacity=64)  # the router's block size is 4
    clock, r, ev, mon, svc = setup(ctx, [])
    try:
        assert call(svc, {"op": "add_worker", "worker": "w", "endpoint": eng.endpoint})["ok"]
        assert eng.wait_for_subscribers(1, 5000)
        eng.request(list(range(32)))
        eng.publish()
        settle(ev, [eng], lambda: ev.subscriber.metrics()["batches"] == 1)
        with caplog.at_level(logging.WARNING, logger="kvroute.sidecar"):
            h = call(svc, {"op": "health"})["result"]
        assert h["status"] == "degraded" and h["reasons"] == {"w": ["block_size_mismatch"]}, h
        assert any("block size" in rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING)
        assert not r.cache_credited("w")
    finally:
        ev.close()
        eng.close()
