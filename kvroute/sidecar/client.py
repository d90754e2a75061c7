"""``KVRouteClient``: a small synchronous client of the sidecar's ZMQ protocol.

    from kvroute.sidecar import KVRouteClient
    with KVRouteClient("tcp://127.0.0.1:5600") as c:
        d = c.route(token_ids, request_id="r1")      # dict: worker, predicted_cached_tokens, ...
        ...                                          # send the request to d["worker"]
        c.prefill_done("r1"); c.finish("r1")

Error replies raise the matching kvroute exception (``NoHealthyWorkerError``,
``UnknownRequestError``, ``BadRequestError`` ...; unknown types raise
:class:`RemoteError`); no reply within ``timeout_s`` raises
:class:`SidecarTimeoutError` (the socket is then rebuilt, so a late reply
cannot be mistaken for the next one).  Not thread-safe: one client per thread.
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Sequence

import msgpack
import numpy as np
import zmq

from ..kvindex.errors import InvalidTokensError
from .errors import ERROR_CLASSES, RemoteError, SidecarTimeoutError


class KVRouteClient:
    """Synchronous request/reply over a DEALER socket (module docstring)."""

    def __init__(self, address: str, *, timeout_s: float = 5.0, context: zmq.Context | None = None) -> None:
        #: Server address, e.g. ``tcp://127.0.0.1:5600``.
        self.address = address
        #: Seconds to wait for each reply.
        self.timeout_s = timeout_s
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._sock = self._connect()

    def _connect(self) -> zmq.Socket:
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.address)
        return s

    def close(self) -> None:
        self._sock.close(linger=0)

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
        self._sock.send_multipart([b"", payload])
        deadline = time.monotonic() + self.timeout_s
        while True:
            # one deadline for the whole call: stale replies to earlier requests do not extend it
            wait_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self._sock.poll(wait_ms, zmq.POLLIN):
                self._sock.close(linger=0)
                self._sock = self._connect()
                raise SidecarTimeoutError(f"no reply from {self.address} within {self.timeout_s} s")
            frames = self._sock.recv_multipart()
            try:
                reply = msgpack.unpackb(frames[-1], raw=False, strict_map_key=False)
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
