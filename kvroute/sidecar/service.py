"""The sidecar's request handlers, independent of the transport.

:meth:`Service.handle` takes one msgpack request payload and returns one
msgpack reply payload; it never raises.  The wire protocol is documented in
``docs/protocol.md``.  Handlers are registered by op name in ``Service.OPS``
(no if/elif chain).  The ZMQ loop (:mod:`.server`) only moves bytes.

Who touches what: the service mutates the :class:`Router` (through its
methods) and asks the event source to follow / forget workers; the metrics
object only observes.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import msgpack
import numpy as np

from ..router import Role, Router
from .decode import MAX_TOKENS, unpack_request
from .errors import BadRequestError, UnknownOpError, wire_name
from .health import HealthMonitor, health_doc
from .metrics import Metrics

log = logging.getLogger("kvroute.sidecar")


def _need(req: dict, key: str, types: tuple[type, ...] | type, *, optional: bool = False) -> Any:
    v = req.get(key)
    if v is None:
        if optional:
            return None
        raise BadRequestError(f"missing field {key!r}")
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BadRequestError(f"field {key!r} must be {types}, not bool")
    if not isinstance(v, types):
        raise BadRequestError(f"field {key!r} has type {type(v).__name__}")
    return v


def _worker_id(req: dict) -> Any:
    v = req.get("worker")
    if v is None or isinstance(v, bool) or not isinstance(v, (str, int)):
        raise BadRequestError("field 'worker' must be a str or int")
    return v


def _request_id(req: dict) -> Any:
    v = req.get("request_id")
    if v is None or isinstance(v, bool) or not isinstance(v, (str, int, bytes)):
        raise BadRequestError("field 'request_id' must be a str, int or bytes")
    return v


class Service:
    """Routing requests in, replies out (see the module docstring)."""

    def __init__(self, router: Router, metrics: Metrics | None = None, events: Any = None,
                 clock: Callable[[], float] = time.perf_counter, monitor: HealthMonitor | None = None) -> None:
        #: The router all decisions come from.
        self.router = router
        #: Prometheus metrics (observed only).
        self.metrics = metrics
        #: The KV-event source (a KVEventSubscriber wrapper) or None when no worker publishes events.
        self.events = events
        #: Per-worker health (told about every decision; answers the ``health`` op), or None.
        self.monitor = monitor
        #: Replica sync (a kvroute.sync.SyncRunner) or None; health reads it.
        self.sync: Any = None
        self._clock = clock
        #: Per-thread state of :meth:`handle` (its reply packer).
        self._local = threading.local()
        self.OPS: dict[str, Callable[[dict], Any]] = {
            "route": self.op_route,
            "prefill_done": self.op_prefill_done,
            "finish": self.op_finish,
            "add_worker": self.op_add_worker,
            "remove_worker": self.op_remove_worker,
            "drain_worker": self.op_drain_worker,
            "mark_unhealthy": self.op_mark_unhealthy,
            "load": self.op_load,
            "stats": self.op_stats,
            "health": self.op_health,
            "ping": lambda req: {"pong": True},
        }

    # ------------------------------------------------------------------ entry
    def _packer(self) -> msgpack.Packer:
        """This thread's reply packer (``msgpack.packb`` makes and frees a 1 MiB buffer per call: several
        us per reply; a Packer is not thread-safe, and the big-request thread handles requests too)."""
        try:
            return self._local.packer
        except AttributeError:
            pk = self._local.packer = msgpack.Packer(use_bin_type=True)
            return pk

    def handle(self, payload: bytes | memoryview) -> bytes:
        """One request payload (bytes, or a memoryview of a big message) -> one reply payload.  Never raises."""
        t0 = self._clock()
        rid = None
        op = "?"
        try:
            req = unpack_request(payload)  # big int arrays: numpy arrays decoded without the GIL
            if not isinstance(req, dict):
                raise BadRequestError("a request is a msgpack map")
            rid = req.get("id")
            op = req.get("op")
            if not isinstance(op, str):
                op = "?"
                raise BadRequestError("missing field 'op'")
            fn = self.OPS.get(op)
            if fn is None:
                op_label = op
                op = "?"
                raise UnknownOpError(f"unknown op {op_label!r}; known: {sorted(self.OPS)}")
            result = fn(req)
            reply = {"id": rid, "ok": True, "result": result}
            outcome = "ok"
        except Exception as exc:  # every failure becomes a typed error reply
            name = wire_name(exc)
            if name == "Internal":
                log.exception("internal error handling op %s", op)
            reply = {"id": rid, "ok": False, "error": {"type": name, "message": str(exc)}}
            outcome = name
        try:
            out = self._packer().pack(reply)
        except Exception as exc:  # e.g. an id that cannot be echoed (the packer resets itself)
            out = msgpack.packb({"id": None, "ok": False, "error": {"type": "BadRequest", "message": str(exc)}})
            outcome = "BadRequest"
        if self.metrics is not None:
            self.metrics.observe_request(op, outcome, self._clock() - t0)
        return out

    # ------------------------------------------------------------------ ops
    def op_route(self, req: dict) -> dict:
        rid = _request_id(req)
        lora = _need(req, "lora_name", str, optional=True)
        salt = _need(req, "cache_salt", str, optional=True)
        toks = req.get("token_ids")
        hashes = req.get("hashes")
        if (toks is None) == (hashes is None):
            raise BadRequestError("give exactly one of 'token_ids' or 'hashes'")
        r = self.router
        if toks is not None:
            if isinstance(toks, (bytes, bytearray, memoryview)):  # memoryview: a big request's bytes, not copied
                if len(toks) % 4:
                    raise BadRequestError("'token_ids' as bytes must be uint32 little-endian (length % 4 == 0)")
                if len(toks) > 4 * MAX_TOKENS:
                    raise BadRequestError(f"prompt of {len(toks) // 4} tokens; at most {MAX_TOKENS} per request")
                arr = np.frombuffer(toks, dtype="<u4")
            elif isinstance(toks, np.ndarray):  # a big int array, checked by the decoder (uint32)
                arr = toks
            elif isinstance(toks, list):
                if bool in set(map(type, toks)):  # msgpack true/false would hash as tokens 1/0
                    raise BadRequestError("'token_ids' must be ints, not booleans")
                arr = toks
            else:
                raise BadRequestError("'token_ids' must be a list of ints or uint32-LE bytes")
            if not len(arr):
                raise BadRequestError("empty prompt: 'token_ids' has no tokens")
            d = r.route(arr, request_id=rid, lora_name=lora, cache_salt=salt)
        else:
            if isinstance(hashes, np.ndarray):  # a big array, checked by the decoder (uint64)
                pass
            elif not isinstance(hashes, list) or not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h < 1 << 64 for h in hashes):
                raise BadRequestError("'hashes' must be a list of unsigned 64-bit ints")
            n = _need(req, "num_tokens", int)
            if not 0 <= n <= MAX_TOKENS:
                raise BadRequestError(f"'num_tokens' must lie in [0, {MAX_TOKENS}], got {n}")
            if len(hashes) * r.block_size > MAX_TOKENS:
                raise BadRequestError(f"{len(hashes)} block hashes are more than {MAX_TOKENS} tokens")
            if not len(hashes) and not n:
                raise BadRequestError("empty prompt: no 'hashes' and 'num_tokens' 0")
            d = r.route_hashes(hashes, num_tokens=n, request_id=rid)
        if self.metrics is not None:
            self.metrics.observe_decision(d)
        if self.monitor is not None:
            self.monitor.note_routed(d.worker)
        return d.to_dict(costs=bool(req.get("costs", True)))

    def op_prefill_done(self, req: dict) -> dict:
        self.router.prefill_done(_request_id(req))
        return {}

    def op_finish(self, req: dict) -> dict:
        self.router.finish(_request_id(req))
        return {}

    def op_add_worker(self, req: dict) -> dict:
        wid = _worker_id(req)
        role = _need(req, "role", str, optional=True) or "both"
        cap = _need(req, "capacity_blocks", int, optional=True)
        endpoint = _need(req, "endpoint", str, optional=True) or ""
        replay = _need(req, "replay_endpoint", str, optional=True) or ""
        try:
            role = Role.parse(role)
        except ValueError as exc:
            raise BadRequestError(str(exc)) from None
        if endpoint:  # subscribe first: a refused endpoint leaves the router as it was
            if self.events is None:
                raise BadRequestError("this service has no KV-event source to subscribe with")
            self.events.follow(wid, endpoint, replay or None)
        self.router.add_worker(wid, role=role, capacity_blocks=cap)
        return {"worker": wid}

    def op_remove_worker(self, req: dict) -> dict:
        wid = _worker_id(req)
        if self.events is not None:
            self.events.unfollow(wid)
        self.router.remove_worker(wid)
        if self.metrics is not None:
            self.metrics.forget_worker(wid)
        return {"worker": wid}

    def op_drain_worker(self, req: dict) -> dict:
        self.router.drain_worker(_worker_id(req))
        return {}

    def op_mark_unhealthy(self, req: dict) -> dict:
        v = req.get("unhealthy", True)
        if not isinstance(v, bool):
            raise BadRequestError("'unhealthy' must be a bool")
        self.router.mark_unhealthy(_worker_id(req), v)
        return {}

    def op_load(self, req: dict) -> dict:
        kw = {}
        for k in ("waiting", "running", "queue_tokens", "capacity_blocks"):
            v = _need(req, k, int, optional=True)
            if v is not None:
                kw[k] = v
        u = req.get("kv_usage")
        if u is not None:
            if isinstance(u, bool) or not isinstance(u, (int, float)):
                raise BadRequestError("'kv_usage' must be a number in [0, 1]")
            kw["kv_usage"] = float(u)
        self.router.update_load(_worker_id(req), **kw)
        return {}

    def op_stats(self, req: dict) -> dict:
        out = self.router.stats()
        with self.router.lock:
            out["index"] = self.router.index.stats()
        out["events"] = _wire_keys(self.events.metrics()) if self.events is not None else {}
        if self.sync is not None:
            out["sync"] = _wire_keys(self.sync.stats())
        return out

    def op_health(self, req: dict | None = None) -> dict:
        return health(self.router, self.events, self.sync, self.monitor)


def health(router: Router, events: Any, sync: Any = None, monitor: Any = None) -> dict:
    """The health document: the monitor's per-worker reasons when there is a monitor, else
    :func:`kvroute.sidecar.health.health_doc` (``ok`` / ``degraded`` when some worker is stale / ``down``
    without a healthy worker); with replica sync, ``sync`` and, while the channel is unreachable, the
    reason under ``reasons["replica_sync"]`` (this replica then routes alone: ``degraded``)."""
    doc = monitor.health() if monitor is not None else health_doc(router, events)
    if sync is not None:
        reasons = sync.health_reasons()
        doc["sync"] = {"connected": sync.connected, "peers": len(sync.sync.peers)}
        if reasons:
            doc["reasons"]["replica_sync"] = reasons
            if doc["status"] == "ok":
                doc["status"] = "degraded"
    doc["backend"] = getattr(router.index, "backend", "python")
    return doc


def _wire_keys(doc: Any) -> Any:
    """Map keys msgpack cannot round-trip as keys (tuples: data-parallel workers) to strings."""
    if isinstance(doc, dict):
        return {(k if isinstance(k, (str, int)) else str(k)): _wire_keys(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [_wire_keys(v) for v in doc]
    return doc
