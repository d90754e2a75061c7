"""Input limits of the sidecar (issue 17): each bound refused with a typed error, the service keeps serving.

* ``num_tokens`` and prompt length bounded by ``MAX_TOKENS`` (2**21), as documented;
* ``add_worker`` endpoints ZMQ accepts but nothing can ever listen on (port 99999, an ipc
  path in a missing directory) are refused;
* empty prompts and boolean token ids are refused (nothing left in flight);
* a snapshot path that is a directory, or in a missing directory, is refused at start, by name;
* the HTTP endpoint's listen backlog holds a burst of connections;
* a busy HTTP port is named in the error.
"""
from __future__ import annotations

import socket

import msgpack
import numpy as np
import pytest

from kvroute.adapters.subscriber import EndpointError, KVEventSubscriber
from kvroute.kvindex import KVIndex
from kvroute.router import Router
from kvroute.sidecar import SidecarConfig
from kvroute.sidecar.errors import ConfigError
from kvroute.sidecar.metrics import HTTPEndpoint, Metrics
from kvroute.sidecar.server import SidecarServer
from kvroute.sidecar.service import MAX_TOKENS, Service


def call(svc: Service, msg) -> dict:
    return msgpack.unpackb(svc.handle(msgpack.packb(msg, use_bin_type=True)), raw=False, strict_map_key=False)


def err(rep: dict) -> str | None:
    return None if rep["ok"] else rep["error"]["type"]


def test_prompt_size_limits_are_enforced():
    r = Router(["a", "b"], 16)
    svc = Service(r, Metrics(r))
    for n in (2**63, 2**40, MAX_TOKENS + 1):
        assert err(call(svc, {"op": "route", "request_id": f"n{n}", "hashes": [1, 2], "num_tokens": n})) == "BadRequest"
    too_long = np.zeros(MAX_TOKENS + 16, "<u4").tobytes()
    assert err(call(svc, {"op": "route", "request_id": "big", "token_ids": too_long})) == "BadRequest"
    many = list(range(1, MAX_TOKENS // 16 + 2))  # more blocks than MAX_TOKENS tokens can fill
    assert err(call(svc, {"op": "route", "request_id": "h", "hashes": many, "num_tokens": 0})) == "BadRequest"
    assert r.in_flight() == 0
    assert all(s["prefill_tokens"] == 0 for s in r.stats()["workers"])
    ok = np.zeros(MAX_TOKENS, "<u4").tobytes()  # the documented maximum itself is accepted
    assert err(call(svc, {"op": "route", "request_id": "max", "token_ids": ok})) is None


def test_empty_prompts_and_boolean_token_ids_are_refused():
    r = Router(["a"], 16)
    svc = Service(r, Metrics(r))
    for msg in ({"token_ids": []}, {"token_ids": b""}, {"hashes": [], "num_tokens": 0},
                {"token_ids": [True, False]}, {"token_ids": [1, 2, True]}):
        rep = call(svc, {"op": "route", "request_id": "e", **msg})
        assert err(rep) in ("BadRequest", "InvalidTokens"), (msg, rep)
    assert r.in_flight() == 0
    assert err(call(svc, {"op": "route", "request_id": "short", "token_ids": [1, 2, 3]})) is None  # < 1 block: fine
    assert err(call(svc, {"op": "route", "request_id": "h0", "hashes": [], "num_tokens": 5})) is None


@pytest.mark.parametrize("bad", ["tcp://127.0.0.1:99999", "tcp://127.0.0.1:0", "tcp://127.0.0.1:-1",
                                 "ipc:///nonexistent/dir/sock", "tcp://:5557"])
def test_endpoints_nothing_can_listen_on_are_refused(bad):
    with KVEventSubscriber(KVIndex(16)) as sub:
        with pytest.raises(EndpointError):
            sub.add_worker("w", bad)
        with pytest.raises(EndpointError):
            sub.add_worker("w", "tcp://127.0.0.1:5557", bad)
        assert sub.workers() == []


def test_add_worker_op_refuses_an_unlistenable_endpoint():
    from kvroute.sidecar.events import EventSource

    r = Router(["a"], 16)
    ev = EventSource(r.index, r.lock)
    svc = Service(r, Metrics(r, ev), ev)
    try:
        for bad in ("tcp://127.0.0.1:99999", "ipc:///nonexistent/dir/sock"):
            rep = call(svc, {"op": "add_worker", "worker": "c", "endpoint": bad})
            assert err(rep) == "BadRequest" and r.workers() == ["a"], rep
    finally:
        ev.close()


@pytest.mark.parametrize("where", ["directory", "missing_dir"])
def test_unusable_snapshot_path_is_refused_at_start(tmp_path, where):
    path = tmp_path if where == "directory" else tmp_path / "nope" / "ix.snap"
    cfg = SidecarConfig(bind="tcp://127.0.0.1:*", http_port=0, snapshot=str(path))
    with pytest.raises(ConfigError, match="snapshot"):
        SidecarServer(cfg).start()


def test_http_backlog_holds_a_burst_of_connections():
    """Nobody accepts (the endpoint is not started): the kernel's accept queue alone must take
    a burst.  With the old backlog of 5, connections past the 6th wait for SYN retransmits."""
    r = Router(["a"], 16)
    http = HTTPEndpoint("127.0.0.1", 0, Metrics(r), lambda: {"status": "ok"})
    socks = []
    try:
        done = 0
        for _ in range(100):
            s = socket.socket()
            s.settimeout(0.25)
            socks.append(s)
            try:
                s.connect(("127.0.0.1", http.port))
                done += 1
            except OSError:
                pass
        assert done == 100
    finally:
        for s in socks:
            s.close()
        http.httpd.server_close()


def test_a_busy_http_port_is_named():
    r = Router(["a"], 16)
    first = HTTPEndpoint("127.0.0.1", 0, Metrics(r), lambda: {"status": "ok"})
    try:
        with pytest.raises(ConfigError, match=str(first.port)):
            HTTPEndpoint("127.0.0.1", first.port, Metrics(r), lambda: {"status": "ok"})
    finally:
        first.httpd.server_close()


def test_a_huge_route_does_not_hold_up_other_clients(tmp_path):
    """Client A sends big prompts (2**20 tokens as a msgpack list: ~0.1 s of decoding, hashing
    and matching each); client B's small requests, sent right after, are answered before A's
    reply: big requests run beside the request loop, not in it.  (Timing figures: bench/sidecar_stall.py.)"""
    import threading

    import zmq

    from kvroute.sidecar.config import WorkerConfig

    cfg = SidecarConfig(bind="tcp://127.0.0.1:*", http_port=0, workers=[WorkerConfig("a"), WorkerConfig("b")])
    srv = SidecarServer(cfg, context=zmq.Context()).start()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_ms": 20}, daemon=True)
    t.start()
    ctx = zmq.Context()
    try:
        big, small = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        for s in (big, small):
            s.setsockopt(zmq.LINGER, 0)
            s.connect(srv.address)
        def huge(n):
            return msgpack.packb({"op": "route", "id": n, "request_id": n, "token_ids": list(range(MAX_TOKENS // 2))},
                                 use_bin_type=True)

        big.send_multipart([b"", huge("big1")])
        big.send_multipart([b"", huge("big2")])  # fully received while big1 is handled
        assert big.poll(20_000)
        assert msgpack.unpackb(big.recv_multipart()[-1], raw=False)["id"] == "big1"
        for i in range(5):  # the server now works on big2 (or has it queued)
            small.send_multipart([b"", msgpack.packb({"op": "route", "id": i, "request_id": i, "token_ids": [1] * 64})])
        order = []
        poller = zmq.Poller()
        poller.register(big, zmq.POLLIN)
        poller.register(small, zmq.POLLIN)
        while len(order) < 6:
            ready = dict(poller.poll(20_000))
            assert ready, order
            for s in (small, big):
                if s in ready:
                    rep = msgpack.unpackb(s.recv_multipart()[-1], raw=False)
                    assert rep["ok"], rep
                    order.append(rep["id"])
        assert order[-1] == "big2", order
    finally:
        ctx.destroy(linger=0)
        srv.stop()
        t.join(10)
        srv.close()
