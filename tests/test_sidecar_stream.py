"""The sidecar's stream transport (``stream_bind``, kvroute/sidecar/stream.py; issue 14's sidecar target).

Length-prefixed msgpack over a Unix or TCP socket, answered by the request loop itself.  Checked here:
the same replies as the ZMQ socket (which keeps working beside it), pipelining and replies in request
order, frames split across reads, big requests through the big-request thread keeping a connection's
order, bad input (garbage payloads, an oversized frame, a client vanishing mid-frame) answered or
dropped while other connections keep being served, the socket file's lifecycle, the config checks.
Timing figures: bench/sidecar.py (``--transports``).
"""
from __future__ import annotations

import os
import socket
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from kvroute.sidecar import KVRouteClient, SidecarConfig
from kvroute.sidecar.config import WorkerConfig
from kvroute.sidecar.errors import ConfigError, UnknownRequestError
from kvroute.sidecar.server import BIG_REQUEST_BYTES, SidecarServer
from kvroute.sidecar.stream import MAX_FRAME_BYTES, frame, parse_stream_address


@pytest.fixture(params=["unix", "tcp"])
def server(request, tmp_path):
    bind = f"unix://{tmp_path}/kv.sock" if request.param == "unix" else "tcp://127.0.0.1:0"
    cfg = SidecarConfig(bind="tcp://127.0.0.1:*", stream_bind=bind, http_port=0, approximate="off",
                        workers=[WorkerConfig(f"w{i}") for i in range(4)])
    srv = SidecarServer(cfg, context=zmq.Context()).start()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_ms": 10}, daemon=True)
    t.start()
    yield srv
    srv.stop()
    t.join(10)
    srv.close()


def connect(srv: SidecarServer) -> socket.socket:
    family, addr = parse_stream_address(srv.stream_address)
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(addr)
    return s


def read_reply(s: socket.socket, buf: bytearray) -> dict | None:
    """The next reply on ``s`` (None: the server closed the connection)."""
    while True:
        if len(buf) >= 4:
            n = int.from_bytes(buf[:4], "big")
            if len(buf) >= 4 + n:
                out = msgpack.unpackb(bytes(buf[4:4 + n]), raw=False, strict_map_key=False)
                del buf[:4 + n]
                return out
        data = s.recv(1 << 16)
        if not data:
            return None
        buf += data


def pack(msg: dict) -> bytes:
    return frame(msgpack.packb(msg, use_bin_type=True))


def test_same_replies_as_the_zmq_socket(server):
    toks = np.arange(1000, 1000 + 64 * 16, dtype=np.uint32)
    with KVRouteClient(server.stream_address, transport="stream", timeout_s=10) as c, \
            KVRouteClient(server.address, timeout_s=10) as z:
        assert c.transport == "stream" and z.transport == "zmq"
        d1 = c.route(toks, request_id="s1")
        d2 = z.route(toks, request_id="z1")
        assert d1["worker"] == d2["worker"]  # the second sees the first's pending prefix: same worker
        assert d2["predicted_cached_tokens"] == len(toks)
        assert set(d1) == set(d2) and "costs" in d1
        assert c.ping() and z.ping()
        c.finish("s1")
        z.finish("z1")
        with pytest.raises(UnknownRequestError):
            c.finish("s1")
        assert c.stats()["decisions"] == 2


def test_unix_addresses_pick_the_stream_transport(tmp_path):
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        KVRouteClient(f"unix://{tmp_path}/nobody.sock")


def test_pipelined_requests_are_answered_in_order_even_split_byte_by_byte(server):
    s = connect(server)
    buf = bytearray()
    msgs = b"".join(pack({"op": "ping", "id": i}) for i in range(50))
    s.sendall(msgs)
    assert [read_reply(s, buf)["id"] for _ in range(50)] == list(range(50))
    one = pack({"op": "route", "id": "r", "request_id": "r", "token_ids": np.arange(40, dtype="<u4").tobytes()})
    for b in one:  # a frame arriving a byte at a time
        s.send(bytes([b]))
    rep = read_reply(s, buf)
    assert rep["ok"] and rep["id"] == "r"
    s.close()


def test_a_big_request_keeps_its_connections_order(server):
    s = connect(server)
    buf = bytearray()
    big = np.random.default_rng(0).integers(0, 50_000, 40_000).astype("<u4").tobytes()
    assert len(big) > BIG_REQUEST_BYTES  # answered by the big-request thread
    s.sendall(pack({"op": "route", "id": 1, "request_id": "big", "token_ids": big, "costs": False})
              + pack({"op": "ping", "id": 2}) + pack({"op": "finish", "id": 3, "request_id": "big"}))
    reps = [read_reply(s, buf) for _ in range(3)]
    assert [r["id"] for r in reps] == [1, 2, 3] and all(r["ok"] for r in reps)
    assert reps[0]["result"]["num_tokens"] == 40_000
    s.close()


def test_bad_input_gets_a_reply_or_a_closed_connection_and_others_are_served(server):
    good = connect(server)
    gbuf = bytearray()
    bad = connect(server)
    buf = bytearray()
    bad.sendall(frame(b"\xc1 not msgpack") + frame(msgpack.packb([1, 2])) + frame(b""))
    assert [read_reply(bad, buf)["error"]["type"] for _ in range(3)] == ["BadRequest"] * 3
    bad.sendall(pack({"op": "route", "id": 9, "request_id": "x", "token_ids": [True]}))
    assert read_reply(bad, buf)["error"]["type"] == "BadRequest"  # the connection stays usable
    bad.sendall((MAX_FRAME_BYTES + 1).to_bytes(4, "big") + b"junk")
    rep = read_reply(bad, buf)
    assert rep["error"]["type"] == "BadRequest" and "frame" in rep["error"]["message"]
    assert read_reply(bad, buf) is None  # then closed: the stream cannot be resynchronised
    half = connect(server)
    half.sendall((1000).to_bytes(4, "big") + b"only part of it")
    half.close()  # a client vanishing mid-frame
    good.sendall(pack({"op": "ping", "id": "still"}))
    assert read_reply(good, gbuf)["result"] == {"pong": True}
    with KVRouteClient(server.address, timeout_s=10) as z:  # the ZMQ socket too
        assert z.ping()
    good.close()


def test_many_connections_come_and_go(server):
    for _ in range(3):
        socks = [connect(server) for _ in range(40)]
        for i, s in enumerate(socks):
            s.sendall(pack({"op": "ping", "id": i}))
        for i, s in enumerate(socks):
            assert read_reply(s, bytearray())["id"] == i
            s.close()
    deadline = time.monotonic() + 5
    while server.stream is not None and server.stream.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.stream.connections == 0  # every closed connection was released


def test_unix_socket_file_lifecycle(tmp_path):
    path = tmp_path / "kv.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a file left by a killed server: nobody listens
    stale.close()
    cfg = SidecarConfig(bind="tcp://127.0.0.1:*", stream_bind=f"unix://{path}", http_port=0)
    srv = SidecarServer(cfg, context=zmq.Context()).start()
    try:
        assert srv.stream_address == f"unix://{path}"
        with pytest.raises(ConfigError, match="another server"):  # a live one is never taken over
            SidecarServer(SidecarConfig(bind="tcp://127.0.0.1:*", stream_bind=f"unix://{path}", http_port=0),
                          context=zmq.Context()).start()
    finally:
        srv.close()
    assert not path.exists()
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        SidecarServer(SidecarConfig(bind="tcp://127.0.0.1:*", stream_bind=f"unix://{regular}", http_port=0),
                      context=zmq.Context()).start()
    assert regular.read_text() == "x"


@pytest.mark.parametrize("bad", ["udp://x:1", "tcp://127.0.0.1", "tcp://:5", "tcp://h:70000", "unix://", 5])
def test_bad_stream_bind_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        SidecarConfig.from_dict({"stream_bind": bad})


def test_ready_line_names_the_stream_address(tmp_path):
    import json

    from kvroute.sidecar.process import spawn_serve

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"bind": "tcp://127.0.0.1:*", "http_port": 0,
                               "stream_bind": f"unix://{tmp_path}/r.sock", "workers": [{"id": "a"}]}))
    proc, ready = spawn_serve(str(cfg), timeout_s=120)
    try:
        assert ready["stream_address"] == f"unix://{tmp_path}/r.sock"
        with KVRouteClient(ready["stream_address"], timeout_s=10) as c:
            assert c.route([1] * 32, request_id=1)["worker"] == "a"
    finally:
        proc.terminate()
        proc.wait(60)
    assert proc.returncode == 0 and not os.path.exists(f"{tmp_path}/r.sock")


def test_partly_received_long_frames_are_bounded_over_all_connections(server, monkeypatch):
    from kvroute.sidecar import stream as stream_mod

    monkeypatch.setattr(stream_mod, "MAX_PENDING_FRAME_BYTES", 300 << 10)
    toks = np.random.default_rng(1).integers(0, 50_000, 50_000).astype("<u4").tobytes()  # 200 KB frames
    payload = msgpack.packb({"op": "route", "id": "a", "request_id": "a", "token_ids": toks, "costs": False},
                            use_bin_type=True)
    first, second = connect(server), connect(server)
    fbuf, sbuf = bytearray(), bytearray()
    first.sendall(frame(payload)[:100_000])  # the server now holds a 200 KB buffer for it
    time.sleep(0.2)
    second.sendall(frame(payload)[:1000])  # a second one would pass the bound
    rep = read_reply(second, sbuf)
    assert rep["error"]["type"] == "BadRequest" and "being received" in rep["error"]["message"]
    assert read_reply(second, sbuf) is None
    first.sendall(frame(payload)[100_000:])  # the first completes and is answered
    rep = read_reply(first, fbuf)
    assert rep["ok"] and rep["result"]["num_tokens"] == 50_000
    assert server.stream._pending_bytes == 0
    first.close()
