"""One conformance suite for every sync transport (in-process bus, a real Redis stream), then the
SyncRunner's threads over each: load propagates, an outage degrades and resyncs."""
from __future__ import annotations

import sys
import os
import time

import pytest

from kvroute.router import Router
from kvroute.sync import MemoryBus, ReplicaSync, SyncRunner, SyncUnavailable

sys.path.insert(0, os.path.dirname(__file__))
from sync_server import RedisProcess, shared_url, stream_key  # noqa: E402

pytestmark = pytest.mark.timeout(60)


class MemoryBackend:
    def __init__(self) -> None:
        self.bus = MemoryBus()

    def make(self):
        return self.bus.transport()

    def outage(self, down: bool) -> None:
        self.bus.down = down


class RedisBackend:
    def __init__(self, url: str) -> None:
        from kvroute.sync.redis_transport import RedisTransport

        self.url, self.key, self.cls = url, stream_key(), RedisTransport

    def make(self):
        return self.cls(self.url, stream=self.key, timeout_s=0.5)


@pytest.fixture(params=["memory", "redis"])
def backend(request):
    if request.param == "memory":
        return MemoryBackend()
    return RedisBackend(shared_url())


def test_publish_read_in_order_everyone_sees_everything(backend):
    a, b = backend.make(), backend.make()
    for i in range(50):
        (a if i % 2 else b).publish(b"m%d" % i)
    want = [b"m%d" % i for i in range(50)]
    for t in (a, b):
        got = []
        while len(got) < 50:
            got += t.read(0.5)
        assert got == want
        assert t.read(0.01) == []
    a.close(), b.close()


def test_recent_window_and_cursor(backend):
    a = backend.make()
    a.publish(b"old")
    b = backend.make()
    assert b"old" in b.recent(60.0)
    a.publish(b"new")
    assert b.read(0.5) == [b"new"]  # recent() moved the cursor past "old"


def test_memory_outage_raises():
    be = MemoryBackend()
    t = be.make()
    be.outage(True)
    for call in (lambda: t.publish(b"x"), lambda: t.read(0.01), lambda: t.recent(1)):
        with pytest.raises(SyncUnavailable):
            call()


def test_redis_unreachable_raises():
    from kvroute.sync.redis_transport import RedisTransport

    from sync_server import free_port

    t = RedisTransport(f"redis://127.0.0.1:{free_port()}/0", stream=stream_key(), timeout_s=0.2)
    with pytest.raises(SyncUnavailable):
        t.publish(b"x")
    with pytest.raises(SyncUnavailable):
        t.read(0.05)


def wait_for(cond, timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def loads(r: Router) -> list[tuple[int, int]]:
    return [(r.worker_state(w).active_requests, r.worker_state(w).decode_blocks) for w in ("w0", "w1")]


def runners(make, n: int = 2, **kw):
    out = []
    for i in range(n):
        r = Router(["w0", "w1"], 4, request_ttl_s=60.0)
        s = ReplicaSync(r, f"r{i}", lease_s=kw.get("lease_s", 3.0), heartbeat_s=kw.get("heartbeat_s", 0.2))
        out.append((r, SyncRunner(s, make(), poll_s=0.02, catch_up_s=kw.get("catch_up_s", 1.0), retry_s=0.05).start()))
    return out


def test_runner_threads_propagate_load(backend):
    (ra, xa), (rb, xb) = runners(backend.make)
    try:
        for i in range(20):
            ra.route(list(range(i, i + 16)), request_id=i)
        wait_for(lambda: loads(rb) == loads(ra), what="load to propagate")
        for i in range(20):
            ra.finish(i)
        wait_for(lambda: loads(rb) == [(0, 0), (0, 0)], what="release to propagate")
        assert xa.health_reasons() == [] and xa.connected
    finally:
        xa.close(), xb.close()


def test_late_replica_catches_up_before_start_returns(backend):
    (ra, xa), = runners(backend.make, 1)
    try:
        for i in range(10):
            ra.route(list(range(i, i + 16)), request_id=i)
        time.sleep(0.3)  # a's batches (and a heartbeat) are on the channel
        (rc, xc), = runners(backend.make, 1)
        assert xc.caught_up and xc.catch_up_peers == 1
        assert loads(rc) == loads(ra)  # before it answered anything
        xc.close()
    finally:
        xa.close()


def test_memory_outage_degrades_then_resyncs():
    be = MemoryBackend()
    (ra, xa), (rb, xb) = runners(be.make)
    try:
        ra.route(list(range(16)), request_id="x")
        wait_for(lambda: loads(rb) == loads(ra), what="first sync")
        be.outage(True)
        wait_for(lambda: not xb.connected, what="outage seen")
        assert xb.health_reasons() and "routing alone" in xb.health_reasons()[0]
        assert loads(rb) == [(0, 0), (0, 0)]  # cut off: a's load released, b routes alone
        ra.route(list(range(100, 116)), request_id="y")  # lost while the channel is down
        be.outage(False)
        wait_for(lambda: xa.connected and xb.connected and loads(rb) == loads(ra), what="resync")
        assert xb.health_reasons() == []
    finally:
        xa.close(), xb.close()


def test_redis_restart_degrades_then_resyncs():
    srv = RedisProcess().start()
    from kvroute.sync.redis_transport import RedisTransport

    key = stream_key()
    (ra, xa), (rb, xb) = runners(lambda: RedisTransport(srv.url, stream=key, timeout_s=0.3))
    try:
        ra.route(list(range(16)), request_id="x")
        wait_for(lambda: loads(rb) == loads(ra), what="first sync")
        srv.stop()
        wait_for(lambda: not xb.connected and not xa.connected, what="outage seen")
        assert "routing alone" in xb.health_reasons()[0]
        ra.route(list(range(100, 116)), request_id="y")
        rb.route(list(range(200, 216)), request_id="z")
        srv.start()
        wait_for(lambda: xa.connected and xb.connected and loads(rb) == loads(ra), timeout_s=15, what="resync")
        assert loads(ra)[0][0] + loads(ra)[1][0] == 3
    finally:
        xa.close(), xb.close()
        srv.stop()


def test_replica_starts_while_redis_is_down_then_joins():
    from kvroute.sync.redis_transport import RedisTransport

    srv = RedisProcess()  # not started yet
    key = stream_key()
    r = Router(["w0", "w1"], 4, request_ttl_s=60.0)
    x = SyncRunner(ReplicaSync(r, "late", heartbeat_s=0.2), RedisTransport(srv.url, stream=key, timeout_s=0.2),
                   poll_s=0.02, catch_up_s=0.5, retry_s=0.05).start()
    try:
        assert not x.connected and not x.caught_up and "routing alone" in x.health_reasons()[0]
        r.route(list(range(16)), request_id="alone")  # routes alone meanwhile
        srv.start()
        (rb, xb), = runners(lambda: RedisTransport(srv.url, stream=key, timeout_s=0.3), 1)
        wait_for(lambda: x.connected and loads(rb) == loads(r), timeout_s=15, what="join after the server came up")
        xb.close()
    finally:
        x.close()
        srv.stop()
