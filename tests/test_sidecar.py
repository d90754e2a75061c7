"""Sidecar: request handling (in-process), the ZMQ server with a real socket, snapshot, metrics, health."""
from __future__ import annotations

import json
import threading
import urllib.request

import msgpack
import numpy as np
import pytest
import zmq

from kvroute import InvalidTokensError, UnknownWorkerError, block_hashes
from kvroute.router import NoHealthyWorkerError, Router, UnknownRequestError
from kvroute.sidecar import BadRequestError, KVRouteClient, SidecarConfig, UnknownOpError
from kvroute.sidecar.config import WorkerConfig, parse_worker
from kvroute.sidecar.errors import ConfigError
from kvroute.sidecar.metrics import Metrics, _flatten_events
from kvroute.sidecar.server import SidecarServer
from kvroute.sidecar.service import Service


def call(svc: Service, msg) -> dict:
    raw = msg if isinstance(msg, bytes) else msgpack.packb(msg, use_bin_type=True)
    return msgpack.unpackb(svc.handle(raw), raw=False, strict_map_key=False)


def toks(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50_000, n).tolist()


# ------------------------------------------------------------------ service (no sockets)
def test_service_route_cycle_and_typed_errors():
    r = Router(["a", "b"], 16)
    svc = Service(r, Metrics(r))
    p = toks(1, 100)
    r.index.store("b", block_hashes(p, 16)[:3])
    rep = call(svc, {"op": "route", "id": 7, "request_id": "x", "token_ids": np.asarray(p, "<u4").tobytes()})
    assert rep["ok"] and rep["id"] == 7 and rep["result"]["worker"] == "b"
    assert rep["result"]["predicted_cached_tokens"] == 48
    rep = call(svc, {"op": "route", "request_id": "y", "token_ids": p, "costs": False})
    assert rep["ok"] and "costs" not in rep["result"]
    for rid in ("x", "y"):
        assert call(svc, {"op": "prefill_done", "request_id": rid})["ok"]
        assert call(svc, {"op": "finish", "request_id": rid})["ok"]
    # by hashes, on the same (idle again) fleet: the same choice as by tokens
    rep = call(svc, {"op": "route", "request_id": "z", "hashes": block_hashes(p, 16).tolist(), "num_tokens": 100})
    assert rep["ok"] and rep["result"]["worker"] == "b"
    assert call(svc, {"op": "prefill_done", "request_id": "z"})["ok"]
    assert call(svc, {"op": "finish", "request_id": "z"})["ok"]
    bad = [
        (b"\xc1\x00garbage", "BadRequest"),
        (msgpack.packb([1, 2, 3]), "BadRequest"),
        ({"id": 1}, "BadRequest"),
        ({"op": "fly"}, "UnknownOp"),
        ({"op": "route", "request_id": "q"}, "BadRequest"),
        ({"op": "route", "request_id": "q", "token_ids": b"\x01\x02\x03"}, "BadRequest"),
        ({"op": "route", "request_id": "q", "token_ids": [-1, 2]}, "InvalidTokens"),
        ({"op": "route", "request_id": "q", "hashes": [1, "x"], "num_tokens": 32}, "BadRequest"),
        ({"op": "route", "request_id": True, "token_ids": [1]}, "BadRequest"),
        ({"op": "finish", "request_id": "never"}, "UnknownRequest"),
        ({"op": "drain_worker", "worker": "nobody"}, "UnknownWorker"),
        ({"op": "load", "worker": "a", "kv_usage": 3.0}, "BadRequest"),
        ({"op": "load", "worker": "a", "waiting": "many"}, "BadRequest"),
        ({"op": "mark_unhealthy", "worker": "a", "unhealthy": "yes"}, "BadRequest"),
    ]
    for msg, typ in bad:
        rep = call(svc, msg)
        assert not rep["ok"] and rep["error"]["type"] == typ, (msg, rep)
    # still serving; duplicate ids are typed
    assert call(svc, {"op": "route", "request_id": "d", "token_ids": p})["ok"]
    assert call(svc, {"op": "route", "request_id": "d", "token_ids": p})["error"]["type"] == "DuplicateRequest"
    # no healthy worker -> typed error
    for w in ("a", "b"):
        assert call(svc, {"op": "drain_worker", "worker": w})["ok"]
    rep = call(svc, {"op": "route", "request_id": "n", "token_ids": p})
    assert rep["error"]["type"] == "NoHealthyWorker"
    assert call(svc, {"op": "health"})["result"]["status"] == "down"
    assert call(svc, {"op": "add_worker", "worker": "c", "capacity_blocks": 100})["ok"]
    assert call(svc, {"op": "health"})["result"]["status"] == "ok"
    assert call(svc, {"op": "load", "worker": "c", "waiting": 3, "kv_usage": 0.5})["ok"]
    assert r.worker_state("c").reported_waiting == 3
    st = call(svc, {"op": "stats"})["result"]
    assert st["index"]["entries"] == 3 and st["decisions"] == 4
    assert call(svc, {"op": "remove_worker", "worker": "c"})["ok"]
    assert "c" not in r.workers()
    text = svc.metrics.render().decode()
    assert 'kvroute_decisions_total{worker="b"} 4.0' in text
    assert 'op="fly"' not in text  # unknown op names never become label values (bounded cardinality)
    assert 'kvroute_requests_total{op="?",outcome="UnknownOp"} 1.0' in text
    assert 'kvroute_requests_total{op="?",outcome="BadRequest"}' in text
    assert "kvroute_decision_latency_seconds_count 4.0" in text
    assert "kvroute_index_entries 3.0" in text


def test_add_worker_with_a_bad_endpoint_changes_nothing_and_removal_drops_its_series():
    from kvroute.sidecar.events import EventSource

    r = Router(["a"], 16)
    ev = EventSource(r.index, r.lock)
    svc = Service(r, Metrics(r, ev), ev)
    try:
        for bad in ("tcp://*:5557", "nonsense", "tcp://127.0.0.1:notaport"):
            rep = call(svc, {"op": "add_worker", "worker": "c", "endpoint": bad})
            assert not rep["ok"] and rep["error"]["type"] == "BadRequest", rep
            assert r.workers() == ["a"] and ev.subscriber.workers() == []
        rep = call(svc, {"op": "add_worker", "worker": "c", "endpoint": "tcp://127.0.0.1:1"})
        assert rep["ok"] and r.workers() == ["a", "c"] and ev.subscriber.workers() == ["c"]
        assert call(svc, {"op": "route", "request_id": 1, "hashes": [1], "num_tokens": 16})["ok"]
        assert call(svc, {"op": "route", "request_id": 2, "hashes": [2], "num_tokens": 16})["ok"]  # cold: fair share
        text = svc.metrics.render().decode()
        assert 'kvroute_decisions_total{worker="c"} 1.0' in text and 'worker="a"} 1.0' in text
        assert call(svc, {"op": "remove_worker", "worker": "c"})["ok"]
        assert ev.subscriber.workers() == [] and r.workers() == ["a"]
        text = svc.metrics.render().decode()
        assert 'kvroute_decisions_total{worker="c"}' not in text
        assert 'kvroute_decisions_total{worker="a"} 1.0' in text
    finally:
        ev.close()
    svc_no_events = Service(r, Metrics(r))
    rep = call(svc_no_events, {"op": "add_worker", "worker": "d", "endpoint": "tcp://127.0.0.1:1"})
    assert rep["error"]["type"] == "BadRequest" and "d" not in r.workers()


def test_flatten_subscriber_metrics():
    fams = {f.name: f for f in _flatten_events({"gaps": 2, "resyncs": {"no_endpoint": 1},
                                                "workers": {"w0": {"stale": True, "batches": 5}},
                                                "lag_seconds": {"count": 3, "sum": 0.5, "buckets": [(0.1, 1)]}})}
    assert fams["kvroute_events_gaps"].samples[0].value == 2
    assert fams["kvroute_events_resyncs_no_endpoint"].samples[0].value == 1
    assert fams["kvroute_events_worker_batches"].samples[0].labels == {"worker": "w0"}
    assert fams["kvroute_events_worker_stale"].samples[0].value == 1.0
    assert fams["kvroute_events_lag_seconds_sum"].samples[0].value == 0.5


def test_config_file_and_flags(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('block_size = 32\npolicy = "dynamo"\n[weights]\ntemperature = 0.5\n'
                 '[[workers]]\nid = "w0"\nendpoint = "tcp://127.0.0.1:1"\nrole = "prefill"\n')
    cfg = SidecarConfig.from_file(p)
    assert cfg.block_size == 32 and cfg.weights == {"temperature": 0.5} and cfg.workers[0].role == "prefill"
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"block_size": 16, "workers": [{"id": 3}]}))
    assert SidecarConfig.from_file(j).workers[0].id == 3
    assert parse_worker("w1=tcp://h:1,tcp://h:2") == WorkerConfig("w1", "tcp://h:1", "tcp://h:2")
    assert cfg.request_ttl_s == 3600.0
    for bad in ('block_size = 0\n', 'request_ttl_s = -1\n', 'request_ttl_s = "x"\n', 'nonsense = 1\n', '[[workers]]\nid = "a"\nrole = "x"\n', 'block_size = \n'):
        p.write_text(bad)
        with pytest.raises(ConfigError):
            SidecarConfig.from_file(p)


# ------------------------------------------------------------------ server with real sockets
@pytest.fixture
def server(tmp_path):
    cfg = SidecarConfig(bind="tcp://127.0.0.1:*", http_port=-1, snapshot=str(tmp_path / "idx.snap"),
                        workers=[WorkerConfig("a"), WorkerConfig("b")])
    srv = SidecarServer(cfg, context=zmq.Context()).start()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_ms": 20}, daemon=True)
    t.start()
    yield srv
    srv.stop()
    t.join(10)
    srv.close()


def test_server_roundtrip_malformed_frames_and_http(server):
    ctx = zmq.Context.instance()
    with KVRouteClient(server.address, timeout_s=5) as c:
        assert c.ping()
        p = toks(5, 64)
        server.router.index.store("a", block_hashes(p, 16))
        d = c.route(p, request_id=1)
        assert d["worker"] == "a" and d["predicted_cached_tokens"] == 64
        c.prefill_done(1)
        c.finish(1)
        with pytest.raises(UnknownRequestError):
            c.finish(1)
        with pytest.raises(BadRequestError):
            c.call_raw(b"\x00\x01not msgpack at all")
        with pytest.raises(UnknownOpError):
            c.call("teleport")
        with pytest.raises(InvalidTokensError):  # caught client-side: never wrapped into uint32
            c.route(np.array([5, -1]), request_id=9)
        # a REQ socket (with the empty delimiter frame) works too; an extra frame gets an error reply
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(server.address)
        req.send(msgpack.packb({"op": "ping", "id": "r"}))
        assert req.poll(5000)
        assert msgpack.unpackb(req.recv())["result"] == {"pong": True}
        req.close()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(server.address)
        dealer.send_multipart([b"x", b"y", b"z"])
        assert dealer.poll(5000)
        assert msgpack.unpackb(dealer.recv_multipart()[-1])["error"]["type"] == "BadRequest"
        dealer.close()
        c.drain_worker("a")
        c.drain_worker("b")
        with pytest.raises(NoHealthyWorkerError):
            c.route(p, request_id=2)
        base = f"http://127.0.0.1:{server.http.port}"
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(base + "/health", timeout=5)
        assert ei.value.code == 503
        c.mark_unhealthy("a", False)
        h = json.loads(urllib.request.urlopen(base + "/health", timeout=5).read())
        assert h["status"] == "ok" and h["healthy_workers"] == 1
        text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert 'kvroute_decisions_total{worker="a"} 1.0' in text
        assert "kvroute_predicted_hit_ratio 1.0" in text
        assert 'kvroute_workers{status="draining"} 1.0' in text
        assert c.ping()


def test_snapshot_written_on_close_and_restored(tmp_path):
    snap = str(tmp_path / "s.snap")
    cfg = SidecarConfig(bind="tcp://127.0.0.1:*", http_port=0, snapshot=snap, workers=[WorkerConfig("a")])
    srv = SidecarServer(cfg, context=zmq.Context()).start()
    srv.router.index.store("a", [1, 2, 3])
    srv.close()
    srv2 = SidecarServer(cfg, context=zmq.Context()).start()
    try:
        assert srv2.router.request_ttl_s == 3600.0
        assert srv2.restored and srv2.router.index.match([1, 2, 3])["a"].total == 3
        d = srv2.router.route_hashes([1, 2, 3], num_tokens=48, request_id=1)
        assert d.predicted_cached_tokens == 48
    finally:
        srv2.config.snapshot = ""
        srv2.close()
    with open(snap, "r+b") as f:  # corrupt: the server starts empty instead of failing
        f.seek(30)
        f.write(b"\xff\xff\xff")
    srv3 = SidecarServer(cfg, context=zmq.Context()).start()
    try:
        assert not srv3.restored and len(srv3.router.index) == 0
    finally:
        srv3.config.snapshot = ""
        srv3.close()


def test_client_raises_remote_error_on_a_garbled_reply():
    from kvroute.sidecar import RemoteError

    ctx = zmq.Context()
    srv = ctx.socket(zmq.ROUTER)
    srv.setsockopt(zmq.LINGER, 0)
    port = srv.bind_to_random_port("tcp://127.0.0.1")
    try:
        with KVRouteClient(f"tcp://127.0.0.1:{port}", timeout_s=5, context=ctx) as c:
            for garbage in (b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"id": None, "ok": False, "error": "x"})):
                result = []
                t = threading.Thread(target=lambda: result.append(pytest.raises(RemoteError, c.ping)))
                t.start()
                assert srv.poll(5000)
                ident, *_ = srv.recv_multipart()
                srv.send_multipart([ident, b"", garbage])
                t.join(10)
                assert result and result[0].value.type in ("BadReply", "Internal")
    finally:
        srv.close()
        ctx.term()


@pytest.mark.timeout(60)  # a leaked socket would make ctx.term() hang
def test_a_failed_snapshot_save_still_releases_the_sockets(tmp_path):
    (tmp_path / "gone").mkdir()
    cfg = SidecarConfig(bind="tcp://127.0.0.1:*", http_port=0, snapshot=str(tmp_path / "gone" / "s.snap"),
                        workers=[WorkerConfig("a")])
    ctx = zmq.Context()
    srv = SidecarServer(cfg, context=ctx).start()
    (tmp_path / "gone").rmdir()  # (a missing directory at start is refused: test_sidecar_limits)
    with pytest.raises(OSError):
        srv.close()
    assert srv.sock is None and srv.events.subscriber._closed
    ctx.term()  # returns: no socket of this context is left open


@pytest.mark.timeout(60)  # a leaked socket would make ctx.term() hang
def test_a_failed_start_releases_what_it_opened(server):
    ctx = zmq.Context()
    cfg = SidecarConfig(bind=server.address, http_port=0, workers=[WorkerConfig("a", "tcp://127.0.0.1:1")])
    srv = SidecarServer(cfg, context=ctx)
    with pytest.raises(zmq.ZMQError):  # the address is taken
        srv.start()
    assert srv.sock is None and srv.events.subscriber._closed
    ctx.term()  # returns: no socket of this context is left open


def test_client_timeout_is_typed_and_recovers(server):
    import socket

    with socket.socket() as s:  # a port with nobody behind it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from kvroute.sidecar import SidecarTimeoutError

    with KVRouteClient(f"tcp://127.0.0.1:{port}", timeout_s=0.2) as c:
        with pytest.raises(SidecarTimeoutError):
            c.ping()
    with KVRouteClient(server.address, timeout_s=5) as c:
        assert c.ping()


def test_restart_resumes_event_streams_from_the_saved_positions(tmp_path):
    """The sidecar saves each stream's next seq beside the snapshot; after a restart it asks the
    engine to replay only what was published while it was down, so the restored index stays
    (an engine buffering 5 batches could not replay from seq 0: without positions the worker
    would be resynced, i.e. cleared)."""
    import os
    import sys
    import time

    sys.path.insert(0, os.path.dirname(__file__))
    from fake_engine import FakeEngine

    ctx = zmq.Context()
    eng = FakeEngine(ctx, block_size=16, capacity=4096, replay_buffer=5)
    snap = str(tmp_path / "s.snap")
    cfg = SidecarConfig(bind="tcp://127.0.0.1:*", http_port=0, snapshot=snap,
                        workers=[WorkerConfig("w", eng.endpoint, eng.replay_endpoint)])

    def wait_applied(srv):
        deadline = time.monotonic() + 20
        while srv.events.positions() != [("w", 0, eng.seq, True)]:
            assert time.monotonic() < deadline, srv.events.subscriber.metrics()
            eng.serve_replay(10)  # paces the wait on a real socket, answers replays

    try:
        srv = SidecarServer(cfg, context=ctx).start()
        assert eng.wait_for_subscribers(1, 5000)
        for i in range(8):
            eng.request(toks(100 + i, 64))
            eng.publish()
        wait_applied(srv)
        srv.close()
        assert json.load(open(snap + ".seq"))["streams"] == [["w", 0, 8, True]]
        for i in range(2):  # published while no sidecar listens (still in the engine's buffer)
            eng.request(toks(200 + i, 64))
            eng.publish()
        srv2 = SidecarServer(cfg, context=ctx).start()
        try:
            assert srv2.restored and srv2.resume == {("w", 0): 8}
            assert eng.wait_for_subscribers(1, 5000)
            eng.request(toks(300, 64))
            eng.publish()
            wait_applied(srv2)
            m = srv2.events.subscriber.metrics()
            assert m["resyncs"] == {} and m["replays_failed"] == {} and m["batches"] == 3
            with srv2.lock:
                assert srv2.router.index.blocks_of("w") == eng.true_blocks()
        finally:
            srv2.config.snapshot = ""
            srv2.close()
        from kvroute import KVIndex

        KVIndex(16).save(snap)  # positions saved with another snapshot are never used
        cfg.snapshot = snap  # (srv2's close was told to skip saving)
        srv3 = SidecarServer(cfg, context=ctx)
        srv3._restore()
        assert srv3.restored and srv3.resume == {}
    finally:
        eng.close()
        ctx.destroy(linger=0)


def test_a_worker_added_at_run_time_with_an_endpoint_is_followed(server):
    """The server was started with no KV-event endpoint at all; add_worker with one subscribes
    (the loop thread runs), the engine's events fill the index, and routing follows them."""
    import os
    import sys
    import time

    sys.path.insert(0, os.path.dirname(__file__))
    from fake_engine import FakeEngine

    ctx = zmq.Context()
    eng = FakeEngine(ctx, block_size=16, capacity=4096)
    try:
        with KVRouteClient(server.address, timeout_s=5) as c:
            assert c.add_worker("c", endpoint=eng.endpoint, replay_endpoint=eng.replay_endpoint) == {"worker": "c"}
            assert eng.wait_for_subscribers(1, 5000)
            p = toks(7, 64)
            eng.request(p)
            eng.publish()
            deadline = time.monotonic() + 20
            while c.stats()["events"]["workers"].get("c", {}).get("next_seq") != 1:
                assert time.monotonic() < deadline
                eng.serve_replay(10)  # paces the wait on a real socket
            d = c.route(p, request_id="r")
            assert d["worker"] == "c" and d["predicted_cached_tokens"] == 64
            c.remove_worker("c")
            with pytest.raises(UnknownWorkerError):
                c.drain_worker("c")
            while "c" in c.stats()["events"]["workers"]:  # the loop thread unsubscribes asynchronously
                assert time.monotonic() < deadline
                eng.serve_replay(10)
    finally:
        eng.close()
        ctx.destroy(linger=0)


def test_stream_completeness_is_saved_beside_the_positions(tmp_path):
    """A stream saved *incomplete* (events lost since the engine's cache was last empty) used to
    resume as complete, so the next orphan from before the loss resynced (cleared) the worker: the
    flag is saved with the position and the stream resumes incomplete."""
    from kvroute import KVIndex
    from kvroute.adapters.subscriber import KVEventSubscriber
    from kvroute.sidecar.server import _load_positions, _save_positions

    snap = str(tmp_path / "s.snap")
    KVIndex(16).save(snap)
    _save_positions(snap, [("w", 0, 8, False), ("v", 1, 3, True), ("old", 0, 5)])
    gaps: set = set()
    assert _load_positions(snap, gaps) == {("w", 0): 8, ("v", 1): 3, ("old", 0): 5}
    assert gaps == {("w", 0)}
    with open(snap + ".seq") as f:
        doc = json.load(f)
    doc["streams"][0][3] = "no"  # a flag that is not a bool: the file is unusable, as any bad entry
    with open(snap + ".seq", "w") as f:
        json.dump(doc, f)
    assert _load_positions(snap, gaps := set()) == {} and gaps == set()

    ctx = zmq.Context()
    sub = KVEventSubscriber(KVIndex(16), context=ctx)
    try:
        sub.add_worker("w", "tcp://127.0.0.1:5", start_seq=8, incomplete=[0])
        sub.add_worker("v", "tcp://127.0.0.1:6", start_seq=3)
        sub.add_worker("z", "tcp://127.0.0.1:7", incomplete=[0])  # from seq 0: a fresh history, complete
        status = {w["worker"]: w["complete"] for w in sub.metrics()["workers"].values()}
        assert status == {"w": False, "v": True, "z": True}
    finally:
        sub.close()
        ctx.destroy(linger=0)
