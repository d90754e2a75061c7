"""``KVRouteClient``: a small synchronous client of the sidecar's ZMQ protocol.

    from kvroute.sidecar import KVRouteClient
    with KVRouteClient("tcp://127.0.0.1:5600") as c:
        d = c.route(token_ids, request_id="r1")      # dict: worker, predicted_cached_tokens, ...
        ...                                          # send the request to d["worker"]
        c.prefill_done("r1"); c.finish("r1")

``KVRouteClient("unix:///run/kvroute.sock")`` (or ``transport="stream"`` with a ``tcp://`` address)
speaks the server's stream transport (``stream_bind``, :mod:`.stream`): same requests and replies,
less CPU per request on both sides.

Error replies raise the matching kvroute exception (``NoHealthyWorkerError``,
``UnknownRequestError``, ``BadRequestError`` ...; unknown types raise
:class:`RemoteError`); no reply within ``timeout_s`` raises
:class:`SidecarTimeoutError` (the socket is then rebuilt, so a late reply
cannot be mistaken for the next one).  Not thread-safe: one client per thread.
"""
from __future__ import annotations

import itertools
import socket
import time
from typing import Any, Sequence

import msgpack
import numpy as np
import zmq

from ..kvindex.errors import InvalidTokensError
from .errors import ERROR_CLASSES, RemoteError, SidecarTimeoutError


class _ZmqConn:
    """A DEALER socket speaking ``[b"", payload]``."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.s = ctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.connect(address)

    def send(self, payload: bytes) -> None:
        self.s.send_multipart([b"", payload])

    def recv(self, timeout_s: float) -> bytes | None:
        if not self.s.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN):
            return None
        return self.s.recv_multipart()[-1]

    def close(self) -> None:
        self.s.close(linger=0)


class _StreamConn:
    """A socket speaking the stream transport (4-byte big-endian length + payload; :mod:`.stream`)."""

    def __init__(self, address: str, timeout_s: float) -> None:
        from .stream import parse_stream_address

        family, addr = parse_stream_address(address)
        self.s = socket.socket(family, socket.SOCK_STREAM)
        self.s.settimeout(timeout_s)
        try:
            self.s.connect(addr)
        except OSError:
            self.s.close()
            raise
        if family != socket.AF_UNIX:
            self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def send(self, payload: bytes) -> None:
        self.s.sendall(len(payload).to_bytes(4, "big") + payload)

    def recv(self, timeout_s: float) -> bytes | None:
        deadline = time.monotonic() + timeout_s
        buf = self.buf
        while True:
            if len(buf) >= 4:
                n = int.from_bytes(buf[:4], "big")
                if len(buf) >= 4 + n:
                    out = bytes(buf[4:4 + n])
                    del buf[:4 + n]
                    return out
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.s.settimeout(left)
            try:
                data = self.s.recv(1 << 20)
            except (socket.timeout, BlockingIOError):
                return None
            if not data:
                raise RemoteError("ConnectionClosed", "the server closed the stream connection")
            buf += data

    def close(self) -> None:
        self.s.close()


class KVRouteClient:
    """Synchronous request/reply over a DEALER socket, or over the stream transport (module docstring)."""

    def __init__(self, address: str, *, timeout_s: float = 5.0, context: zmq.Context | None = None,
                 transport: str = "auto") -> None:
        #: Server address: ``tcp://127.0.0.1:5600`` (ZMQ), ``unix:///run/kvroute.sock`` (stream transport).
        self.address = address
        #: Seconds to wait for each reply.
        self.timeout_s = timeout_s
        if transport == "auto":
            transport = "stream" if address.startswith("unix://") else "zmq"
        if transport not in ("zmq", "stream"):
            raise ValueError(f"transport must be 'zmq', 'stream' or 'auto', got {transport!r}")
        #: ``zmq`` (the ROUTER socket, ``bind``) or ``stream`` (the server's ``stream_bind``; a tcp:// address
        #: is ZMQ unless this says ``stream``).
        self.transport = transport
        self._ctx = (context or zmq.Context.instance()) if transport == "zmq" else None
        self._ids = itertools.count(1)
        self._sock = self._connect()

    def _connect(self) -> "_ZmqConn | _StreamConn":
        if self.transport == "stream":
            return _StreamConn(self.address, self.timeout_s)
        return _ZmqConn(self._ctx, self.address)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "KVRouteClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ core
    def call(self, op: str, **fields: Any) -> Any:
        """Send one request and return its ``result`` (or raise its error)."""
        rid = next(self._ids)
        msg = {k: v for k, v in fields.items() if v is not None}
        msg["op"] = op
        msg["id"] = rid
        return self.call_raw(msgpack.packb(msg, use_bin_type=True), rid)

    def call_raw(self, payload: bytes, rid: Any = None) -> Any:
        """Send pre-encoded bytes (tests and benches use this for malformed requests)."""
        self._sock.send(payload)
        deadline = time.monotonic() + self.timeout_s
        while True:
            # one deadline for the whole call: stale replies to earlier requests do not extend it
            data = self._sock.recv(deadline - time.monotonic())
            if data is None:
                self._sock.close()
                self._sock = self._connect()
                raise SidecarTimeoutError(f"no reply from {self.address} within {self.timeout_s} s")
            try:
                reply = msgpack.unpackb(data, raw=False, strict_map_key=False)
            except Exception as exc:  # msgpack raises several types; a garbled reply is the server's error
                raise RemoteError("BadReply", f"undecodable reply: {exc}"[:200]) from None
            if not isinstance(reply, dict):
                raise RemoteError("BadReply", f"a reply is a msgpack map, got {type(reply).__name__}")
            if rid is not None and reply.get("id") not in (rid, None):
                continue  # a stale reply to an earlier, timed-out request
            if reply.get("ok"):
                return reply.get("result")
            err = reply.get("error")
            if not isinstance(err, dict):
                err = {}
            typ, message = str(err.get("type", "Internal")), str(err.get("message", ""))
            cls = ERROR_CLASSES.get(typ)
            if cls is None:
                raise RemoteError(typ, message)
            raise cls(message)

    # ------------------------------------------------------------------ ops
    def route(self, token_ids: Any = None, *, request_id: Any, hashes: Sequence[int] | None = None,
              num_tokens: int | None = None, lora_name: str | None = None, cache_salt: str | None = None,
              costs: bool = True) -> dict:
        """Route a prompt (token ids, sent as uint32-LE bytes) or precomputed content hashes."""
        toks = None
        if token_ids is not None:
            arr = np.asarray(token_ids)
            if arr.ndim != 1 or (arr.size and (arr.dtype.kind not in "iu" or int(arr.min()) < 0
                                              or int(arr.max()) > 0xFFFFFFFF)):
                raise InvalidTokensError("token ids must be a 1-D sequence of integers in [0, 2**32 - 1]")
            toks = arr.astype("<u4").tobytes()
        return self.call("route", request_id=request_id, token_ids=toks,
                         hashes=list(hashes) if hashes is not None else None, num_tokens=num_tokens,
                         lora_name=lora_name, cache_salt=cache_salt, costs=None if costs else False)

    def prefill_done(self, request_id: Any) -> None:
        self.call("prefill_done", request_id=request_id)

    def finish(self, request_id: Any) -> None:
        self.call("finish", request_id=request_id)

    def add_worker(self, worker: Any, *, endpoint: str | None = None, replay_endpoint: str | None = None,
                   role: str | None = None, capacity_blocks: int | None = None) -> dict:
        return self.call("add_worker", worker=worker, endpoint=endpoint, replay_endpoint=replay_endpoint,
                         role=role, capacity_blocks=capacity_blocks)

    def remove_worker(self, worker: Any) -> None:
        self.call("remove_worker", worker=worker)

    def drain_worker(self, worker: Any) -> None:
        self.call("drain_worker", worker=worker)

    def mark_unhealthy(self, worker: Any, unhealthy: bool = True) -> None:
        self.call("mark_unhealthy", worker=worker, unhealthy=unhealthy)

    def report_load(self, worker: Any, *, waiting: int | None = None, running: int | None = None,
                    kv_usage: float | None = None, queue_tokens: int | None = None,
                    capacity_blocks: int | None = None) -> None:
        self.call("load", worker=worker, waiting=waiting, running=running, kv_usage=kv_usage,
                  queue_tokens=queue_tokens, capacity_blocks=capacity_blocks)

    def stats(self) -> dict:
        return self.call("stats")

    def health(self) -> dict:
        return self.call("health")

    def ping(self) -> bool:
        return bool(self.call("ping").get("pong"))
