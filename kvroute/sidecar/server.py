"""``SidecarServer``: the ZMQ ROUTER loop, the HTTP endpoint, the event source and the snapshot.

Lifecycle::

    start():  restore the index snapshot (if any) -> Router -> subscribe to the
              workers' KV events -> bind the ROUTER socket -> start /metrics + /health
    serve_forever(): poll the ROUTER socket (and the stream transport's connections,
              ``stream_bind``, :mod:`.stream`); one request in, one reply out,
              until stop() (or SIGTERM/SIGINT via install_signal_handlers)
    close():  stop events and HTTP, save the index snapshot (atomic) and the event
              streams' positions beside it, close sockets

Snapshot and positions.  The index is saved with ``KVIndex.save``; the
position of every event stream (its next sequence number, and whether it was
complete: no events lost since the engine's cache was last empty) goes to
``<snapshot>.seq`` (JSON), tagged with the snapshot file's xxh3-64.  On start, positions whose tag matches the restored snapshot
resume the streams there (``start_seq``), so the batches published while the
sidecar was down are replayed over the restored index; without them a stream
starts at seq 0, and a restored worker whose engine no longer buffers its whole
history is resynced (cleared) at its first event.

Framing: a request is ``[identity, b"", payload]`` (REQ, or DEALER with an
empty delimiter) or ``[identity, payload]`` (plain DEALER); the reply uses the
same envelope.  Payloads are documented in ``docs/protocol.md``.  Anything
else is answered with a ``BadRequest`` error when it can be, else dropped and
counted; the loop never stops on bad input.
"""
from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import queue
import signal
import threading
import time
from typing import Any

import msgpack
import xxhash
import zmq

from ..kvindex import KVIndex, SnapshotError
from ..kvindex.atomic import atomic_write
from ..router import Router
from .config import SidecarConfig
from .errors import ConfigError
from .metrics import HTTPEndpoint, Metrics
from .health import HealthConfig, HealthMonitor, follow_stream_health
from .service import Service, health
from .stream import StreamListener

log = logging.getLogger("kvroute.sidecar")


class SidecarServer:
    """One ``kvroute serve`` process (module docstring)."""

    def __init__(self, config: SidecarConfig, *, context: zmq.Context | None = None) -> None:
        self.config = config
        self._ctx = context or zmq.Context.instance()
        self._stop = threading.Event()
        #: Shared by the router (reads) and the event subscriber (applies batches).
        self.lock = threading.RLock()
        self.router: Router | None = None
        self.events: Any = None
        self.metrics: Metrics | None = None
        self.service: Service | None = None
        #: Per-worker health reasons and the router's cache credit (checked from the serve loop).
        self.monitor: HealthMonitor | None = None
        self.http: HTTPEndpoint | None = None
        self.sock: zmq.Socket | None = None
        #: The address actually bound (resolves ``tcp://host:0`` / ``*`` wildcards).
        self.address: str = ""
        #: The stream transport's listener (``stream_bind``; :mod:`.stream`), else None; touched by the loop only.
        self.stream: StreamListener | None = None
        #: Its address as bound (a tcp port 0 resolved), else "".
        self.stream_address: str = ""
        #: Frames that could not even be answered (no identity frame).
        self.dropped_frames = 0
        #: Whether the index came from a snapshot.
        self.restored = False
        #: {(worker, rank): next seq} saved with the restored snapshot (empty: streams start at 0).
        self.resume: dict[tuple[Any, int], int] = {}
        #: Streams of ``resume`` that were incomplete when saved: they resume incomplete.
        self.resume_incomplete: set[tuple[Any, int]] = set()
        #: Replica sync (a kvroute.sync.SyncRunner) when ``sync_url`` is set, else None.
        self.sync: Any = None
        self._approx_check = 0.0

    # ----------------------------------------------------------------- start
    def start(self) -> "SidecarServer":
        """Restore, subscribe, bind and serve HTTP; on any failure release what was opened, then raise."""
        try:
            return self._start()
        except BaseException:
            self._release()
            raise

    def _start(self) -> "SidecarServer":
        cfg = self.config
        check_snapshot_path(cfg.snapshot)
        index = self._restore()
        # with replica sync, each replica breaks ties with its own seed (a shared seed would make replicas
        # break the ties of simultaneous requests identically, herding them onto one worker)
        seed = cfg.seed ^ xxhash.xxh64_intdigest((cfg.replica_name or cfg.bind).encode()) if cfg.sync_url else cfg.seed
        r = Router((), cfg.block_size, policy=cfg.policy, weights=cfg.weights or None, seed=seed,
                   index=index, pending_ttl_s=cfg.pending_ttl_s, lock=self.lock,
                   request_ttl_s=cfg.request_ttl_s or None, approx_ttl_s=cfg.approx_ttl_s,
                   approx_capacity_blocks=cfg.approx_capacity_blocks or None)
        self.router = r
        for w in cfg.workers:
            ranks = max(1, w.dp_size)
            for key in ([w.id] if ranks == 1 else [(w.id, k) for k in range(ranks)]):
                r.add_worker(key, role=w.role, capacity_blocks=w.capacity_blocks)
                if cfg.approximate == "all" or (cfg.approximate == "auto" and not w.endpoint):
                    r.set_approximate(key)
        # always: workers with an endpoint may also be added at run time (the add_worker op)
        self.events = self._make_events(index)
        self.metrics = Metrics(r, self.events)
        self.monitor = HealthMonitor(r, self.events, HealthConfig(cfg.health_silence_s, cfg.health_connect_grace_s))
        self.metrics.monitor = self.monitor
        self.service = Service(r, self.metrics, self.events, monitor=self.monitor)
        for w in cfg.workers:
            if w.endpoint:
                start = {rank: seq for (wid, rank), seq in self.resume.items() if wid == w.id}
                self.events.follow(w.id, w.endpoint, w.replay_endpoint or None, dp_size=w.dp_size, topic=w.topic,
                                   start_seq=start or None,
                                   incomplete=[rank for (wid, rank) in self.resume_incomplete if wid == w.id])
        self.events.start()
        if cfg.sync_url:
            self.sync = self._start_sync(r)  # catches up before the socket answers
        self.service.sync = self.sync
        self.metrics.sync = self.sync
        sock = self.sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.bind(cfg.bind)
        self.address = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        if cfg.stream_bind:
            self.stream = StreamListener(cfg.stream_bind)
            self.stream_address = self.stream.address
        if cfg.http_port != 0:  # -1: any free port
            self.http = HTTPEndpoint(cfg.http_host, max(0, cfg.http_port), self.metrics,
                                     lambda: health(r, self.events, self.sync, self.monitor))
            self.http.start()
        gc.collect()
        gc.freeze()  # the restored index is long-lived: keep it out of every future GC pass
        log.info("kvroute serve: %s, policy %s, %d workers, http %s, index %d entries%s", self.address,
                 cfg.policy, len(cfg.workers), self.http.port if self.http else "off", len(r.index),
                 " (restored)" if self.restored else "")
        return self

    def _start_sync(self, router: Router) -> Any:
        from ..sync import ReplicaSync, SyncRunner, make_transport  # top floor: only the sidecar wires it

        cfg = self.config
        name = cfg.replica_name or cfg.bind
        rs = ReplicaSync(router, name, lease_s=cfg.sync_lease_s, heartbeat_s=cfg.sync_heartbeat_s)
        runner = SyncRunner(rs, make_transport(cfg.sync_url, stream=cfg.sync_stream), catch_up_s=cfg.sync_catch_up_s)
        return runner.start()

    def sync_ready(self) -> dict[str, Any]:
        """The sync part of the ready line: origin, whether the catch-up saw every live peer's state."""
        s = self.sync
        return {"origin": s.sync.origin, "connected": s.connected, "caught_up": s.caught_up,
                "peers": s.catch_up_peers}

    def refresh_approximate(self) -> None:
        """``approximate = auto``: workers whose event stream is stale are predicted from decisions until
        fresh events rebuild them (then their predicted entries go)."""
        if self.config.approximate != "auto" or self.events is None or self.router is None:
            return
        endpoints = {w.id for w in self.config.workers if w.endpoint} | set(self.events.subscriber.workers())
        follow_stream_health(self.router, self.events.stale_workers(), endpoints)

    def _make_events(self, index: KVIndex) -> Any:
        try:
            from .events import EventSource
        except ImportError as exc:  # the subscriber module is part of kvroute; this is a broken install
            raise RuntimeError(f"KV-event subscriber unavailable: {exc}") from exc
        ev = EventSource(index, self.lock)
        return ev

    def _restore(self) -> KVIndex:
        path = self.config.snapshot
        if path and os.path.exists(path):
            try:
                idx = KVIndex.load(path)
            except SnapshotError as exc:
                log.error("ignoring unusable snapshot %s: %s", path, exc)
            else:
                if idx.block_size not in (None, self.config.block_size):
                    log.error("ignoring snapshot %s: block size %s != %s", path, idx.block_size, self.config.block_size)
                else:
                    idx.block_size = self.config.block_size
                    self.restored = True
                    self.resume = _load_positions(path, self.resume_incomplete)
                    return idx
        return KVIndex(self.config.block_size)

    # ----------------------------------------------------------------- loop
    def serve_forever(self, poll_ms: int = 100) -> None:
        sock, handle = self.sock, self.service.handle  # type: ignore[union-attr]
        tick = self.monitor.tick if self.monitor is not None else (lambda: None)
        assert sock is not None
        lane = _BigLane(self._ctx, handle)
        stream = self.stream
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(lane.rx, zmq.POLLIN)
        if stream is not None:
            poller.register(stream.fileno(), zmq.POLLIN)
        #: client (a ZMQ identity, or ("s", key) for a stream connection) -> its requests in the big lane:
        #: its later requests follow them there, so one client's replies keep their order
        in_lane: dict[Any, int] = {}

        def stream_dispatch(key: int, payload: Any) -> bytes | None:
            client = ("s", key)
            if len(payload) > BIG_REQUEST_BYTES or client in in_lane:
                in_lane[client] = in_lane.get(client, 0) + 1
                lane.put([_LANE_STREAM, key.to_bytes(8, "big")], payload)
                return None
            return handle(payload)

        try:
            while not self._stop.is_set():
                tick()
                now = time.monotonic()
                if now >= self._approx_check:  # approximate mode follows stream health (issue 13)
                    self._approx_check = now + 0.25
                    self.refresh_approximate()
                ready = dict(poller.poll(poll_ms))
                if lane.rx in ready:
                    self._send_lane_replies(lane, in_lane)
                if sock in ready:
                    self._serve_batch(sock, handle, lane, in_lane)
                if stream is not None and stream.fileno() in ready:
                    stream.serve(stream_dispatch)
        finally:
            lane.close()
            self._send_lane_replies(lane, in_lane)
            lane.rx.close(linger=0)

    def _send_lane_replies(self, lane: "_BigLane", in_lane: dict[Any, int]) -> None:
        sock = self.sock
        while True:
            try:
                frames = lane.rx.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            tag, frames = frames[0], frames[1:]
            client: Any = frames[0] if tag == _LANE_ZMQ else ("s", int.from_bytes(frames[0], "big"))
            n = in_lane.get(client, 1) - 1
            if n:
                in_lane[client] = n
            else:
                in_lane.pop(client, None)
            if tag == _LANE_STREAM:
                if self.stream is not None:
                    self.stream.send(client[1], frames[1])
                continue
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)  # type: ignore[union-attr]
            except zmq.ZMQError:
                self.dropped_frames += 1

    def _serve_batch(self, sock: zmq.Socket, handle: Any, lane: "_BigLane", in_lane: dict[bytes, int]) -> None:
        """Answer what the ROUTER socket holds (up to 1,024 requests); big ones go to the lane."""
        for _ in range(1024):  # drain what is there, then check the stop flag
            try:
                msg = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            # a big payload stays in the message (a memoryview): copying 8 MiB here held the GIL ~3 ms
            last = msg[-1].buffer if len(msg[-1]) > BIG_REQUEST_BYTES else msg[-1].bytes
            frames = [f.bytes for f in msg[:-1]] + [last]
            if len(frames) == 3 and frames[1] == b"":
                env, payload = frames[:2], frames[2]
            elif len(frames) == 2:
                env, payload = frames[:1], frames[1]
            elif len(frames) >= 2:
                env, payload = frames[:1], None
            else:
                self.dropped_frames += 1
                continue
            if payload is None:
                reply = msgpack.packb({"id": None, "ok": False, "error": {
                    "type": "BadRequest", "message": f"expected [b'', payload] or [payload], got {len(frames) - 1} frames"}})
            elif len(payload) > BIG_REQUEST_BYTES or env[0] in in_lane:
                in_lane[env[0]] = in_lane.get(env[0], 0) + 1
                lane.put([_LANE_ZMQ] + env, payload)
                continue
            else:
                reply = handle(payload)
            try:
                sock.send_multipart(env + [reply], zmq.NOBLOCK)
            except zmq.ZMQError:
                self.dropped_frames += 1

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return (thread- and signal-safe)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    # ----------------------------------------------------------------- close
    def close(self) -> None:
        """Stop events and HTTP, write the snapshot and the streams' positions, close the socket."""
        if self.sync is not None:
            try:
                self.sync.close()
            except Exception:
                log.exception("closing replica sync failed")
            self.sync = None
        if self.events is not None:
            try:
                self.events.stop()  # no batch applied from here on: the index and positions agree
            except Exception:
                log.exception("stopping the event subscriber failed")
        try:
            if self.http is not None:
                self.http.stop()
                self.http = None
            if self.config.snapshot and self.router is not None:
                with self.lock:
                    self.router.index.save(self.config.snapshot)
                    positions = self.events.positions() if self.events is not None else []
                _save_positions(self.config.snapshot, positions)
                log.info("saved index snapshot %s (%d entries)", self.config.snapshot, len(self.router.index))
        finally:  # a failed save (disk full, no permission) still releases the sockets, then raises
            self._release()

    def _release(self) -> None:
        """Close the subscriber, the HTTP endpoint and the ROUTER socket (idempotent; no snapshot)."""
        if self.events is not None:
            try:
                self.events.close()
            except Exception:
                log.exception("closing the event subscriber failed")
        if self.http is not None:
            self.http.stop()
            self.http = None
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        if self.stream is not None:
            self.stream.close()
            self.stream = None


#: First frame of a big-lane reply: which transport the rest (envelope, reply) goes back on.
_LANE_ZMQ, _LANE_STREAM = b"z", b"s"

#: Requests with a payload larger than this (about 16k tokens as bytes) are handled by the big-request
#: thread, beside the request loop: one maximal prompt (2**21 tokens, ~0.1-0.2 s of decoding, hashing
#: and matching) must not hold up every other client.  Small requests never wait behind it, except for
#: the router lock, which the big request holds only while it matches the index (bench/sidecar_stall.py).
BIG_REQUEST_BYTES = 64 << 10


class _BigLane:
    """One thread answering big requests in arrival order; replies come back to the request loop
    over an inproc PUSH/PULL pair (the ROUTER socket and the stream connections are only ever touched
    by the loop's thread).  A request's envelope starts with its transport's tag (``_LANE_ZMQ`` + the
    ROUTER envelope, or ``_LANE_STREAM`` + the connection's key); its reply is envelope + [reply]."""

    _ids = itertools.count()

    def __init__(self, ctx: zmq.Context, handle: Any) -> None:
        addr = f"inproc://kvroute-big-lane-{id(self)}-{next(self._ids)}"
        #: Replies ``env + [reply]``, read by the request loop.
        self.rx = ctx.socket(zmq.PULL)
        self.rx.setsockopt(zmq.LINGER, 0)
        self.rx.bind(addr)
        self._ctx, self._addr, self._handle = ctx, addr, handle
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kvroute-big-requests", daemon=True)
        self._thread.start()

    def put(self, env: list[bytes], payload: bytes) -> None:
        self._q.put((env, payload))

    def _run(self) -> None:
        tx = self._ctx.socket(zmq.PUSH)
        tx.setsockopt(zmq.LINGER, 0)
        tx.connect(self._addr)
        try:
            while True:
                item = self._q.get()
                if item is None:
                    return
                env, payload = item
                tx.send_multipart(env + [self._handle(payload)])  # handle() never raises
        finally:
            tx.close(linger=1000)  # the last replies reach the loop before it closes ``rx``

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()


def check_snapshot_path(path: str) -> None:
    """Raise :class:`ConfigError` unless a snapshot can be written at ``path`` ("" = none):
    found at start, not as a lost snapshot at shutdown."""
    if not path:
        return
    if os.path.isdir(path):
        raise ConfigError(f"snapshot path {path!r} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"snapshot path {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"snapshot path {path!r}: directory {parent!r} is not writable")


def _snapshot_tag(path: str) -> str:
    """xxh3-64 of the snapshot file, as hex: names one snapshot."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_positions(snapshot: str, positions: list[tuple]) -> None:
    """Write ``<snapshot>.seq`` atomically: the streams' positions ``(worker, rank, next_seq[, complete])``,
    tagged with the snapshot they go with."""
    doc = {"snapshot": _snapshot_tag(snapshot), "streams": [list(p) for p in positions]}
    atomic_write(snapshot + ".seq", (json.dumps(doc).encode(),), prefix=".kvroute-seq-")


def _load_positions(snapshot: str, incomplete: set | None = None) -> dict[tuple[Any, int], int]:
    """Positions saved with this very snapshot, else {} (missing, unreadable or from another snapshot);
    ``incomplete`` (when given) receives the streams saved incomplete (a missing flag: complete)."""
    try:
        with open(snapshot + ".seq") as f:
            doc = json.load(f)
        if doc.get("snapshot") != _snapshot_tag(snapshot):
            log.warning("ignoring %s.seq: it belongs to another snapshot; streams start at seq 0", snapshot)
            return {}
        out = {}
        gaps = set()
        for entry in doc["streams"]:
            wid, rank, seq, *rest = entry
            complete = rest[0] if rest else True
            if isinstance(wid, list):
                wid = tuple(wid)
            if type(rank) is not int or type(seq) is not int or rank < 0 or seq < 0 or len(rest) > 1 \
                    or type(complete) is not bool:
                raise ValueError(f"bad stream position {entry!r}")
            out[(wid, rank)] = seq
            if not complete:
                gaps.add((wid, rank))
        if incomplete is not None:
            incomplete |= gaps
        return out
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("ignoring unusable %s.seq (%s); streams start at seq 0", snapshot, exc)
        return {}
