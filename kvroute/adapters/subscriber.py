"""ZMQ KV-event subscriber: feeds a :class:`~kvroute.kvindex.KVIndex` from engines, exactly.

Map of this module:

* :class:`KVEventSubscriber` -- the public object: workers added and removed at
  run time, one event loop, a lock shared with the index's readers, metrics.
* ``_Stream``     -- per (worker, data-parallel rank) state: SUB socket, next
  expected sequence number, out-of-order buffer, replay DEALER, stale flag.
* ``_Metrics``    -- plain counters and a lag histogram (no prometheus here;
  the sidecar maps :meth:`KVEventSubscriber.metrics` to its exporter).

Event loop.  One thread owns every ZMQ socket and a ``zmq.Poller``.  Either the
caller drives it (:meth:`KVEventSubscriber.poll`, one iteration; tests do this
so they never sleep) or :meth:`KVEventSubscriber.start` runs ``poll`` in a
daemon thread.  Other threads talk to the loop only through a command queue
plus an inproc wake-up socket (``add_worker``/``remove_worker``) and through
:attr:`KVEventSubscriber.lock`, which is held while a batch is applied and
which the router holds while it reads the index.

Sequence rules (``docs/events.md`` has the full table).  Per stream, batches
are applied in sequence order starting at 0:

* ``seq == next``: decode and apply, then drain buffered successors.
* ``seq > next``: a gap -- buffer the batch and ask the replay endpoint for
  everything from ``next`` (DEALER ``[b"", next as 8 bytes BE]``; replies
  ``[b"", topic, seq, payload]`` or ``[b"", seq, payload]``; end marker seq -1).
  A gap that cannot be replayed (no endpoint, the publisher's buffer no longer
  has ``next``, timeout, too many buffered batches) *resyncs* the stream.
* ``seq < next``: a duplicate (replay overtook the live stream, or the very
  same payload again) is dropped; anything else is an engine restart: the
  stream's index entries are cleared and ``next`` goes back to 0.  A live seq
  below the stream's first expected one (``start_seq``) is always a restart.

Gaps give up in a loop: after a lost gap the stream goes on from its first
buffered batch, and a second hole further on is requested at once (not at the
engine's next batch).  A batch applied always leaves the buffer (an overrun
can jump onto a batch buffered live).  The batch at seq 0 starts an engine's
history: entries the index held for the stream before it (a re-added worker,
a snapshot without positions) are cleared first, so a replayed history never
counts as second physical copies.

Resync = clear the stream's entries in the index, mark it *stale* and
*incomplete*, continue from the next batch available.  A stale stream becomes
fresh again after ``rebuild_batches`` contiguous batches applied without
orphans (default 1): from then on every event is applied in order again, and
the index holds a subset of the engine's cache (blocks cached before the loss
are unknown until re-announced), which under-predicts hits but never claims a
block the engine has dropped.  ``incomplete`` lasts until the engine's cache
is known empty (restart, ``AllBlocksCleared``): while incomplete, orphans are
expected (parents announced before the loss) and only counted; on a complete
stream an orphan proves lost events and triggers a resync.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import xxhash
import zmq
import zmq.utils.monitor

from kvroute.kvindex import KVIndex, KVRouteError, WorkerId

from .vllm import DecodeError, DecodeLimits, decode_packed

__all__ = ["KVEventSubscriber", "SubscriberConfig", "EndpointError", "rank_endpoint", "LAG_BUCKETS"]

log = logging.getLogger(__name__)

_END_SEQ = b"\xff" * 8
_xxh3 = xxhash.xxh3_64_intdigest
#: Upper bounds (seconds) of the lag histogram buckets; the last bucket is +inf.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_instance_ids = itertools.count()
#: Gap losses after which an outstanding replay is abandoned (its DEALER closed, so late replies
#: cannot reach the new state).  ``overrun`` keeps reading the replay (its later batches are
#: wanted), ``incomplete`` comes with the end marker, ``timeout`` has already closed it.
_ABANDONS_REPLAY = frozenset({"pending_overflow", "no_endpoint", "unreachable"})
#: What a socket of a stream carries (values of ``KVEventSubscriber._by_socket``).
_LIVE, _REPLAY, _MONITOR = "live", "replay", "monitor"


class EndpointError(KVRouteError, ValueError):
    """An endpoint the subscriber cannot connect to: a bind address, or one ZMQ rejects."""


def _check_endpoint(ctx: zmq.Context, endpoint: str) -> None:
    """Raise :class:`EndpointError` unless a socket of ``ctx`` can connect to ``endpoint``.

    A throwaway socket is connected and closed at once (contexts are thread-safe),
    so a bad address is refused in the caller's thread, before the loop drops the
    worker's old subscription.  Host names resolve later, in ZMQ's I/O thread.
    """
    if "://*" in endpoint:
        raise EndpointError(f"{endpoint!r} is a bind address; give the engine's host to connect to")
    scheme, sep, rest = endpoint.partition("://")
    if scheme == "tcp" and sep:
        # ZMQ connects to ports nothing can listen on (0, above 65535) and retries forever
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise EndpointError(f"{endpoint!r}: a tcp endpoint is tcp://HOST:PORT with PORT in 1..65535")
    elif scheme == "ipc" and sep:
        d = os.path.dirname(rest) or "."
        if not os.path.isdir(d):
            raise EndpointError(f"{endpoint!r}: directory {d!r} does not exist, so no engine can bind there")
    probe = ctx.socket(zmq.SUB)
    try:
        probe.connect(endpoint)
    except zmq.ZMQError as exc:
        raise EndpointError(f"cannot connect to {endpoint!r}: {exc}") from None
    finally:
        probe.close(linger=0)


def rank_endpoint(endpoint: str, rank: int, base_rank: int = 0) -> str:
    """Endpoint of data-parallel ``rank``: vLLM publishes rank r on the base port + r.

    ``tcp://host:5557`` with rank 2 -> ``tcp://host:5559``.  Non-TCP endpoints
    (ipc, inproc) cannot be offset: give a mapping {rank: endpoint} instead.
    """
    if rank == base_rank:
        return endpoint
    head, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not endpoint.startswith("tcp://"):
        raise EndpointError(f"cannot derive the endpoint of rank {rank} from {endpoint!r}; pass a mapping {{rank: endpoint}}")
    return f"{head}:{int(port) + rank - base_rank}"


@dataclass(frozen=True, slots=True)
class SubscriberConfig:
    """Tunables of :class:`KVEventSubscriber` (all optional)."""

    #: Seconds to wait for a replay's end marker before the gap counts as lost.
    replay_timeout_s: float = 2.0
    #: Most out-of-order batches buffered per stream while a gap is open.
    max_pending: int = 10_000
    #: Most payload bytes buffered per stream while a gap is open (with ``max_pending``, bounds the memory).
    max_pending_bytes: int = 256 << 20
    #: Contiguous orphan-free batches after a resync before a stream is fresh again.
    rebuild_batches: int = 1
    #: Resync a complete stream when a batch has orphans (see module docstring).
    resync_on_orphan: bool = True
    #: Digests of this many recently applied batches are kept to recognise duplicates.
    dedup_window: int = 256
    #: Most messages read from one socket per loop iteration (fairness between workers).
    max_burst: int = 256
    #: Receive high-water mark of each SUB socket (messages).
    rcvhwm: int = 100_000
    #: Decoder limits.
    limits: DecodeLimits | None = None


class _Stream:
    """State of one (worker, rank) event stream.  Only the loop thread touches it."""

    __slots__ = (
        "worker", "rank", "key", "endpoint", "replay_endpoint", "topic", "sub", "dealer",
        "next_seq", "origin", "last_live", "pending", "pending_bytes", "replay_deadline", "replay_trigger", "digests", "digest_order",
        "stale", "complete", "clean", "batches", "last_ts", "unverified", "added_at", "last_rx", "connected",
        "ever_connected", "disconnected_at", "mismatch", "monitor",
    )

    def __init__(self, worker: WorkerId, rank: int, key: Any, endpoint: str, replay_endpoint: str | None, topic: bytes) -> None:
        self.worker = worker  #: the user's worker id
        self.rank = rank  #: data-parallel rank of this stream
        self.key = key  #: the worker id used in the index (worker, or (worker, rank) with several ranks)
        self.endpoint = endpoint  #: PUB endpoint the SUB socket connects to
        self.replay_endpoint = replay_endpoint  #: ROUTER endpoint for replays, or None
        self.topic = topic  #: subscription prefix
        self.sub: zmq.Socket | None = None
        self.dealer: zmq.Socket | None = None  #: replay socket, created at the first gap
        self.next_seq = 0  #: sequence number of the next batch to apply
        self.origin = 0  #: first seq this stream expected (``start_seq``; 0 after a restart): older ones never reached it
        self.last_live = -1  #: highest sequence number received live (SUB)
        self.pending: dict[int, bytes] = {}  #: seq -> payload received ahead of next_seq
        self.pending_bytes = 0  #: total length of the payloads in ``pending``
        self.replay_deadline: float | None = None  #: clock() deadline of the outstanding replay, or None
        self.replay_trigger = -1  #: highest seq the publisher had sent when the replay was requested
        self.digests: dict[int, int] = {}  #: seq -> xxh3 of the applied payload (last dedup_window)
        self.digest_order: deque[int] = deque()
        self.stale = False  #: the index is known to have lost this stream's events recently
        self.complete = True  #: every event since the engine's cache was last empty has been applied
        self.clean = 0  #: contiguous orphan-free batches since the last resync
        self.batches = 0  #: batches applied
        self.last_ts: float | None = None  #: ``ts`` of the last batch applied
        #: The index holds entries for this key from before this stream (a re-added worker, a
        #: snapshot restored without usable positions) that its history has not yet replaced.
        self.unverified = False
        self.added_at = 0.0  #: clock() when the stream was added
        self.last_rx: float | None = None  #: clock() of the last message received (live or replay)
        self.connected = False  #: the SUB socket has a live connection (ZMQ socket monitor)
        self.ever_connected = False  #: it had one at some point
        self.disconnected_at: float | None = None  #: clock() when the last connection went away
        #: The last batch with stored blocks had blocks of another size than the index's (all dropped).
        self.mismatch = False
        self.monitor: zmq.Socket | None = None  #: PAIR socket of the SUB socket's monitor


class _Metrics:
    """Counters; mutated by the loop thread under the subscriber's lock."""

    COUNTERS = (
        "batches", "events", "blocks_stored", "blocks_removed", "blocks_cleared", "orphans", "unknown_removed",
        "ignored_events", "block_size_mismatch", "malformed_events", "gaps", "gaps_closed", "replay_requests",
        "replay_batches", "restarts", "duplicates", "block_copies_added", "block_copies_released",
    )
    KEYED = ("replays_failed", "resyncs", "decode_errors", "dropped_frames")

    def __init__(self) -> None:
        self.c = dict.fromkeys(self.COUNTERS, 0)
        self.k: dict[str, dict[str, int]] = {name: {} for name in self.KEYED}
        self.lag_counts = [0] * (len(LAG_BUCKETS) + 1)
        self.lag_sum = 0.0
        self.lag_max = 0.0
        self.lag_n = 0

    def bump(self, keyed: str, reason: str, n: int = 1) -> None:
        d = self.k[keyed]
        d[reason] = d.get(reason, 0) + n

    def lag(self, seconds: float) -> None:
        self.lag_counts[bisect.bisect_left(LAG_BUCKETS, seconds)] += 1
        self.lag_sum += seconds
        self.lag_n += 1
        if seconds > self.lag_max:
            self.lag_max = seconds

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.c)
        for name in self.KEYED:
            out[name] = dict(self.k[name])
        cum, buckets = 0, []
        for le, n in zip(LAG_BUCKETS + (float("inf"),), self.lag_counts):
            cum += n
            buckets.append((le, cum))
        out["lag_seconds"] = {"count": self.lag_n, "sum": self.lag_sum, "max": self.lag_max, "buckets": buckets}
        return out


class KVEventSubscriber:
    """Subscribe to engines' KV events and apply them to ``index`` in sequence order.

    ``lock`` (default: a new ``threading.RLock``) is held while a batch is
    applied; pass the router's lock, or hold :attr:`lock` while reading the
    index from another thread.  ``clock`` (monotonic seconds) times replays;
    ``wall_clock`` (epoch seconds) is compared with each batch's ``ts`` for the
    lag histogram.  Both are injectable for tests.
    """

    def __init__(
        self,
        index: KVIndex,
        *,
        config: SubscriberConfig | None = None,
        lock: Any = None,
        context: zmq.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        #: The index batches are applied to.
        self.index = index
        #: Tunables.
        self.config = config or SubscriberConfig()
        #: Held while a batch is applied (and while metrics are read).
        self.lock = lock if lock is not None else threading.RLock()
        self._clock = clock
        self._wall = wall_clock
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._streams: dict[tuple[WorkerId, int], _Stream] = {}
        self._by_key: dict[Any, _Stream] = {}  # index key -> stream (loop thread writes, under lock)
        self._by_socket: dict[zmq.Socket, tuple[_Stream, str]] = {}  # socket -> (stream, _LIVE/_REPLAY/_MONITOR)
        self._poller = zmq.Poller()
        self._m = _Metrics()
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        wake_addr = f"inproc://kvroute-subscriber-{id(self)}-{next(_instance_ids)}"
        self._wake_rx = self._ctx.socket(zmq.PULL)
        self._wake_rx.bind(wake_addr)
        self._wake_tx = self._ctx.socket(zmq.PUSH)
        self._wake_tx.connect(wake_addr)
        self._wake_lock = threading.Lock()
        self._poller.register(self._wake_rx, zmq.POLLIN)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False

    # ----------------------------------------------------------------- workers
    def add_worker(
        self,
        worker_id: WorkerId,
        endpoint: str | Mapping[int, str],
        replay_endpoint: str | Mapping[int, str] | None = None,
        *,
        dp_ranks: Iterable[int] = (0,),
        topic: str = "",
        start_seq: int | Mapping[int, int] | None = None,
        incomplete: Iterable[int] = (),
    ) -> None:
        """Subscribe to a worker's events (one SUB socket per data-parallel rank).

        ``endpoint`` is the PUB endpoint of the lowest rank (ranks r publish on
        its port + r, as vLLM does) or a mapping {rank: endpoint}; the same for
        ``replay_endpoint`` (None: gaps cannot be replayed).  In the index the
        worker is ``worker_id`` when it has one rank, else ``(worker_id, rank)``.
        Re-adding a known worker replaces its subscription: the new stream starts
        at seq 0 again.  Entries the index already holds for it are *unverified*
        (:meth:`stream_status`) and its history is requested at once: the batch
        at seq 0 (an engine's cache is empty before it) replaces them, or, if that
        history is gone, the resync rule clears them.  They are never counted
        as second physical copies.

        ``start_seq`` (per rank, or one int for every rank) resumes a stream
        instead: the first batch expected is that seq, and the index's entries
        for the worker are trusted as they are.  Use it with an index restored
        from a snapshot taken together with :meth:`positions` (under
        :attr:`lock`): the batches published since are requested at once.
        ``incomplete``: ranks whose stream was *incomplete* when that position was
        saved (``stream_status()``; events had been lost since the engine's cache was
        last empty): they resume incomplete, so an orphan from before the loss is
        counted, not taken for a new loss (a resync that would clear the worker).

        Endpoints are checked here (:class:`EndpointError`): bind addresses, tcp
        ports outside 1..65535 and ipc paths in a missing directory are refused.
        """
        if self._closed:
            raise RuntimeError("subscriber is closed")
        ranks = sorted(set(int(r) for r in dp_ranks))
        if not ranks or ranks[0] < 0:
            raise ValueError(f"dp_ranks must be non-empty and non-negative, got {ranks}")
        base = ranks[0]
        incomplete = set(incomplete)
        specs = []
        for r in ranks:
            ep = endpoint.get(r) if isinstance(endpoint, Mapping) else rank_endpoint(endpoint, r, base)
            if not isinstance(ep, str):
                raise EndpointError(f"no endpoint string for rank {r}: {ep!r}")
            if replay_endpoint is None:
                rep = None
            elif isinstance(replay_endpoint, Mapping):
                rep = replay_endpoint.get(r)
            else:
                rep = rank_endpoint(replay_endpoint, r, base)
            for e in (ep, rep):
                if e is not None:
                    _check_endpoint(self._ctx, e)
            key = worker_id if len(ranks) == 1 else (worker_id, r)
            first = start_seq.get(r, 0) if isinstance(start_seq, Mapping) else (start_seq or 0)
            if type(first) is not int or first < 0:
                raise ValueError(f"start_seq must be a non-negative int, got {first!r}")
            specs.append((r, key, ep, rep, first, r not in incomplete or not first))
        self._submit(("add", worker_id, specs, topic.encode()))

    def remove_worker(self, worker_id: WorkerId, *, forget: bool = True) -> None:
        """Stop subscribing to a worker; with ``forget`` also drop it from the index."""
        self._submit(("remove", worker_id, forget))

    def workers(self) -> list[WorkerId]:
        """Workers currently subscribed (commands not yet processed by the loop excluded)."""
        with self.lock:
            return sorted({s.worker for s in self._streams.values()}, key=repr)

    def positions(self) -> dict[Any, int]:
        """Index key -> next sequence number to apply; with a snapshot of the index
        taken under the same :attr:`lock`, enough to resume (``add_worker(start_seq=...)``)."""
        with self.lock:
            return {s.key: s.next_seq for s in self._streams.values()}

    def stale_workers(self) -> set[Any]:
        """Index keys whose events were lost recently (see the module docstring)."""
        with self.lock:
            return {s.key for s in self._streams.values() if s.stale}

    def _submit(self, cmd: tuple) -> None:
        if self._closed:
            raise RuntimeError("subscriber is closed")
        if self._thread is None:
            self._run_command(cmd)  # caller-driven mode: the caller's thread owns the sockets
            return
        self._cmds.put(cmd)
        with self._wake_lock:
            self._wake_tx.send(b"", zmq.NOBLOCK)

    def _run_command(self, cmd: tuple) -> None:
        _COMMANDS[cmd[0]](self, *cmd[1:])

    def _cmd_add(self, worker: WorkerId, specs: list, topic: bytes) -> None:
        # Connect every rank's socket first: if one fails, nothing changes (the old
        # subscription, if any, stays) and no socket is left open.
        socks: list[zmq.Socket] = []
        try:
            for _rank, _key, ep, _rep, _first, _complete in specs:
                sub = self._ctx.socket(zmq.SUB)
                socks.append(sub)
                sub.setsockopt(zmq.LINGER, 0)
                sub.setsockopt(zmq.RCVHWM, self.config.rcvhwm)
                sub.setsockopt(zmq.SUBSCRIBE, topic)
                sub.connect(ep)
        except zmq.ZMQError as exc:
            for sock in socks:
                sock.close(linger=0)
            raise EndpointError(f"worker {worker!r}: cannot subscribe: {exc}") from None
        self._drop_worker(worker, forget=False)
        now = self._clock()
        for (rank, key, ep, rep, first, complete), sub in zip(specs, socks):
            st = _Stream(worker, rank, key, ep, rep, topic)
            st.next_seq = first
            st.origin = first
            st.complete = complete
            st.sub = sub
            st.added_at = now
            with self.lock:
                self._streams[(worker, rank)] = st
                self._by_key[key] = st
                held = self.index.holds_any(key)
                self.index.add_worker(key)
                # entries from before this stream: trusted only when it resumes at their position
                st.unverified = held and first == 0
            self._by_socket[sub] = (st, _LIVE)
            self._poller.register(sub, zmq.POLLIN)
            try:
                mon = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            except zmq.ZMQError:  # no monitor (e.g. out of sockets): connection state stays unknown
                mon = None
            if mon is not None:
                st.monitor = mon
                self._by_socket[mon] = (st, _MONITOR)
                self._poller.register(mon, zmq.POLLIN)
            if held and rep is not None:
                # confirm (or replace) the held entries now, not at the engine's next batch: the
                # replay from ``first`` brings whatever was published while nobody listened
                self._request_replay(st)

    def _cmd_remove(self, worker: WorkerId, forget: bool) -> None:
        self._drop_worker(worker, forget=forget)

    def _drop_worker(self, worker: WorkerId, *, forget: bool) -> None:
        for sk in [sk for sk in self._streams if sk[0] == worker]:
            with self.lock:
                st = self._streams.pop(sk)
                if self._by_key.get(st.key) is st:
                    del self._by_key[st.key]
            if st.monitor is not None and st.sub is not None:
                try:
                    st.sub.disable_monitor()
                except zmq.ZMQError:
                    pass
            for sock in (st.sub, st.dealer, st.monitor):
                if sock is not None:
                    self._close_socket(sock)
            st.sub = st.dealer = st.monitor = None
            if forget:
                with self.lock:
                    if st.key in self.index:
                        self.index.remove_worker(st.key)

    def _close_socket(self, sock: zmq.Socket) -> None:
        self._by_socket.pop(sock, None)
        try:
            self._poller.unregister(sock)
        except KeyError:
            pass
        sock.close(linger=0)

    # -------------------------------------------------------------------- loop
    def poll(self, timeout_ms: int = 100) -> int:
        """Run one loop iteration: wait up to ``timeout_ms`` for messages, handle
        them, expire replays.  Returns the number of messages handled.  Do not
        call it while :meth:`start` runs the loop in its own thread."""
        if self._closed:
            raise RuntimeError("subscriber is closed")
        while True:
            try:
                self._run_command(self._cmds.get_nowait())
            except queue.Empty:
                break
        wait = timeout_ms
        now = self._clock()
        for st in self._streams.values():
            if st.replay_deadline is not None:
                wait = min(wait, max(0, int((st.replay_deadline - now) * 1000) + 1))
        handled = 0
        for sock, _ in self._poller.poll(wait):
            if sock is self._wake_rx:
                while True:
                    try:
                        sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                continue
            entry = self._by_socket.get(sock)
            if entry is None:
                continue
            st, kind = entry
            for _ in range(self.config.max_burst):
                if st.sub is None:  # the stream was dropped while handling
                    break
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if kind is _MONITOR:
                    self._on_monitor(st, frames)
                    continue
                handled += 1
                st.last_rx = self._clock()
                st.ever_connected = True  # a message proves it, even before the monitor says so
                if kind is _REPLAY:
                    self._on_replay(st, frames)
                    if st.dealer is not sock:  # timed out / replaced while reading
                        break
                else:
                    self._on_live(st, frames)
        self._expire_replays()
        return handled

    def start(self) -> "KVEventSubscriber":
        """Run the loop in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError("already started")
        if self._closed:
            raise RuntimeError("subscriber is closed")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kvroute-kv-events", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll(100)
            except Exception:  # never let one bad message kill ingestion
                log.exception("KV event loop iteration failed")
                with self.lock:
                    self._m.bump("dropped_frames", "loop_error")

    def stop(self) -> None:
        """Stop the loop thread (if any); sockets stay open, :meth:`poll` works again."""
        t = self._thread
        if t is None:
            return
        self._stop.set()
        with self._wake_lock:
            self._wake_tx.send(b"", zmq.NOBLOCK)
        t.join()
        self._thread = None
        while True:  # commands that raced with stop run in the caller's thread
            try:
                self._run_command(self._cmds.get_nowait())
            except queue.Empty:
                break

    def close(self) -> None:
        """Stop and close every socket (and the context, if the subscriber made it)."""
        if self._closed:
            return
        self.stop()
        for w in {s.worker for s in self._streams.values()}:
            self._drop_worker(w, forget=False)
        self._wake_rx.close(linger=0)
        self._wake_tx.close(linger=0)
        self._closed = True
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> "KVEventSubscriber":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- handlers
    def _drop(self, reason: str) -> None:
        with self.lock:
            self._m.bump("dropped_frames", reason)

    def _on_monitor(self, st: _Stream, frames: list[bytes]) -> None:
        """A ZMQ socket-monitor event of the stream's SUB socket: connected / disconnected."""
        try:
            ev = zmq.utils.monitor.parse_monitor_message(frames)["event"]
        except Exception:
            return
        with self.lock:
            if ev == zmq.EVENT_CONNECTED:
                st.connected = st.ever_connected = True
                st.disconnected_at = None
            elif ev == zmq.EVENT_DISCONNECTED:
                st.connected = False
                st.disconnected_at = self._clock()

    def _on_live(self, st: _Stream, frames: list[bytes]) -> None:
        if len(frames) != 3:
            return self._drop("bad_frame_count")
        seq_b = frames[1]
        if len(seq_b) != 8 or seq_b == _END_SEQ:
            return self._drop("bad_seq")
        seq = int.from_bytes(seq_b, "big")
        self._on_batch(st, seq, frames[2], live=True)

    def _on_replay(self, st: _Stream, frames: list[bytes]) -> None:
        # [b"", topic, seq, payload] (current) or [b"", seq, payload] (older releases)
        if len(frames) == 4 and frames[0] == b"":
            seq_b, payload = frames[2], frames[3]
        elif len(frames) == 3 and frames[0] == b"":
            seq_b, payload = frames[1], frames[2]
        else:
            return self._drop("bad_replay_frame")
        if len(seq_b) != 8:
            return self._drop("bad_replay_frame")
        if seq_b == _END_SEQ:
            return self._replay_ended(st)
        seq = int.from_bytes(seq_b, "big")
        if st.replay_deadline is not None and seq > st.next_seq:
            # replies are contiguous from the requested start: the publisher no longer has next_seq
            self._give_up_gap(st, "overrun", jump_to=seq)
        with self.lock:
            self._m.c["replay_batches"] += 1
        self._on_batch(st, seq, payload, live=False)

    def _on_batch(self, st: _Stream, seq: int, payload: bytes, *, live: bool) -> None:
        if live:
            if seq > st.last_live:
                last, st.last_live = st.last_live, seq
            else:
                last = st.last_live
        if seq == st.next_seq:
            self._apply(st, seq, payload, replayed=not live)
            self._drain(st)
            return
        if seq > st.next_seq:
            old = st.pending.get(seq)
            if old is not None:
                if old == payload:
                    return self._dup()
                if live:  # same seq, other content, live: the engine restarted
                    return self._restart(st, seq, payload)
                return self._dup()
            opened = not st.pending
            st.pending[seq] = payload
            st.pending_bytes += len(payload)
            if opened:
                with self.lock:
                    self._m.c["gaps"] += 1
            if len(st.pending) > self.config.max_pending or st.pending_bytes > self.config.max_pending_bytes:
                self._give_up_gap(st, "pending_overflow")
                return
            if st.replay_deadline is None:
                self._request_replay(st)
            return
        # seq < next_seq
        if not live:
            return self._dup()  # a replay reply the live stream already delivered
        if seq > last and seq >= st.origin:
            return self._dup()  # the replay overtook the live stream
        # (a live seq below ``origin`` never reached this stream: the engine's sequence went back)
        d = st.digests.get(seq)
        if d is not None and d == _xxh3(payload):
            return self._dup()  # the very same batch again (reordered / duplicated)
        self._restart(st, seq, payload)

    def _dup(self) -> None:
        with self.lock:
            self._m.c["duplicates"] += 1

    def _drain(self, st: _Stream, *, recovered: bool = True) -> None:
        """Apply buffered batches that are now in order; count a gap closed without loss."""
        pending = st.pending
        if not pending:
            return
        while pending:
            payload = pending.pop(st.next_seq, None)
            if payload is None:
                return
            st.pending_bytes -= len(payload)
            self._apply(st, st.next_seq, payload)
        if recovered:
            with self.lock:
                self._m.c["gaps_closed"] += 1

    def _apply(self, st: _Stream, seq: int, payload: bytes, *, replayed: bool = False) -> None:
        m = self._m
        st.next_seq = seq + 1
        buffered = st.pending.pop(seq, None)  # an overrun can jump onto a batch buffered live
        if buffered is not None:
            st.pending_bytes -= len(buffered)
        dg = st.digests
        dg[seq] = _xxh3(payload)
        st.digest_order.append(seq)
        if len(st.digest_order) > self.config.dedup_window:
            dg.pop(st.digest_order.popleft(), None)
        try:
            batch = decode_packed(payload, limits=self.config.limits)  # compiled when the core runs
        except DecodeError as exc:
            with self.lock:
                m.bump("decode_errors", exc.reason)
            log.warning("worker %r seq %d: undecodable batch (%s); resyncing", st.key, seq, exc)
            self._resync(st, "decode_error")
            return
        with self.lock:
            if seq == 0 and st.key in self.index:
                # seq 0 is the first batch of an engine process: its cache was empty.  Entries
                # held from before (a re-added worker, a snapshot restored without usable
                # positions) are replaced by this history, never counted as second copies.
                self.index.clear(st.key)
                st.unverified = False
                st.complete = True
            try:
                res = self.index.apply(st.key, batch)
            except Exception:  # defensive: a decoded batch the index cannot take is a lost batch
                log.exception("worker %r seq %d: index refused a decoded batch; resyncing", st.key, seq)
                m.bump("decode_errors", "apply_error")
                self._resync(st, "decode_error")
                return
            c = m.c
            c["batches"] += 1
            c["events"] += batch.n_events
            c["blocks_stored"] += res.stored
            c["blocks_removed"] += res.removed
            c["blocks_cleared"] += res.cleared
            c["orphans"] += res.orphans
            c["unknown_removed"] += res.unknown_removed
            c["block_copies_added"] += res.copies_added
            c["block_copies_released"] += res.copies_released
            c["ignored_events"] += res.ignored
            c["block_size_mismatch"] += res.block_size_mismatch
            c["malformed_events"] += res.malformed
            if not replayed:  # history fetched by a replay is old by nature: not a delivery lag
                m.lag(self._wall() - batch.ts)
            if res.block_size_mismatch:
                st.mismatch = True
            elif res.stored:
                st.mismatch = False
        st.batches += 1
        st.last_ts = batch.ts
        if batch.has_clear:
            st.complete = True  # the engine's cache was empty; everything since is applied
            st.stale = False
        if res.orphans:
            if st.complete and self.config.resync_on_orphan:
                self._resync(st, "orphan")
            else:
                st.clean = 0
        elif st.stale:
            st.clean += 1
            if st.clean >= self.config.rebuild_batches:
                with self.lock:
                    st.stale = False

    # ------------------------------------------------------------------ resync
    def _resync(self, st: _Stream, reason: str) -> None:
        with self.lock:
            if st.key in self.index:
                self.index.clear(st.key)
            self._m.bump("resyncs", reason)
            st.stale = True
            st.unverified = False
        st.complete = False
        st.clean = 0

    def _restart(self, st: _Stream, seq: int, payload: bytes) -> None:
        log.info("worker %r rank %d: sequence went back to %d; engine restart", st.worker, st.rank, seq)
        with self.lock:
            self._m.c["restarts"] += 1
            if st.key in self.index:
                self.index.clear(st.key)
            st.stale = False
            st.unverified = False
        st.complete = True
        st.clean = 0
        st.next_seq = 0
        st.origin = 0
        st.last_live = seq
        st.pending.clear()
        st.pending_bytes = 0
        st.digests.clear()
        st.digest_order.clear()
        self._cancel_replay(st)
        self._on_batch(st, seq, payload, live=False)  # as the first batch of a new stream

    def _request_replay(self, st: _Stream) -> None:
        failure = self._send_replay(st)
        if failure is not None:
            self._give_up_gap(st, failure)

    def _send_replay(self, st: _Stream) -> str | None:
        """Ask for every batch from ``next_seq``; None, or why the request cannot be sent."""
        if st.replay_endpoint is None:
            return "no_endpoint"
        if st.dealer is None:
            d = None
            try:  # no socket to spare (EMFILE) or a connect ZMQ refuses: the gap cannot be replayed
                d = self._ctx.socket(zmq.DEALER)
                d.setsockopt(zmq.LINGER, 0)
                d.connect(st.replay_endpoint)
            except zmq.ZMQError:
                if d is not None:
                    d.close(linger=0)
                return "unreachable"
            st.dealer = d
            self._by_socket[d] = (st, _REPLAY)
            self._poller.register(d, zmq.POLLIN)
        try:
            st.dealer.send_multipart([b"", st.next_seq.to_bytes(8, "big")], zmq.NOBLOCK)
        except zmq.ZMQError:
            return "unreachable"
        st.replay_deadline = self._clock() + self.config.replay_timeout_s
        st.replay_trigger = max(st.pending) if st.pending else st.next_seq
        with self.lock:
            self._m.c["replay_requests"] += 1
        return None

    def _replay_ended(self, st: _Stream) -> None:
        if st.replay_deadline is None:
            return  # end of a replay we already gave up on
        st.replay_deadline = None
        if not st.pending:
            return
        if st.next_seq > st.replay_trigger:
            self._request_replay(st)  # the remaining gap opened after the request: ask again
        else:
            self._give_up_gap(st, "incomplete")

    def _cancel_replay(self, st: _Stream) -> None:
        st.replay_deadline = None
        if st.dealer is not None:  # late replies of the old request must not reach the new state
            self._close_socket(st.dealer)
            st.dealer = None

    def _expire_replays(self) -> None:
        now = None
        for st in list(self._streams.values()):
            if st.replay_deadline is None:
                continue
            if now is None:
                now = self._clock()
            if now >= st.replay_deadline:
                self._cancel_replay(st)
                if st.pending:
                    self._give_up_gap(st, "timeout")

    def _give_up_gap(self, st: _Stream, reason: str, jump_to: int | None = None) -> None:
        """The batches from next_seq on are lost: resync and continue after them.

        Without ``jump_to`` the stream goes on from its first buffered batch; if the
        buffer still has a hole after that run, the hole is requested at once (a
        second gap must not wait for the engine's next batch), and a hole that cannot
        be requested is given up in turn (a loop, not recursion: thousands of holes).
        """
        while True:
            with self.lock:
                self._m.bump("replays_failed", reason)
            log.warning("worker %r rank %d: gap at seq %d cannot be replayed (%s); resyncing",
                        st.worker, st.rank, st.next_seq, reason)
            self._resync(st, reason)
            if reason in _ABANDONS_REPLAY:
                self._cancel_replay(st)
            target = jump_to if jump_to is not None else (min(st.pending) if st.pending else st.next_seq)
            st.next_seq = target
            for s in [s for s in st.pending if s < target]:
                st.pending_bytes -= len(st.pending.pop(s))
            if jump_to is not None:
                return  # an overrun: the replay goes on delivering from ``target``
            self._drain(st, recovered=False)
            if not st.pending or st.replay_deadline is not None:
                return
            failure = self._send_replay(st)
            if failure is None:
                return
            reason = failure

    # ----------------------------------------------------------------- metrics
    def stream_status(self) -> dict[Any, dict[str, Any]]:
        """Per index key, what health checks need (times on the injected ``clock``):
        ``worker``, ``added_at``, ``last_rx`` (last message received, or None), ``connected``,
        ``ever_connected``, ``disconnected_at``, ``monitored`` (connection state known),
        ``stale``, ``unverified``, ``block_size_mismatch``, ``now``."""
        with self.lock:
            now = self._clock()
            return {st.key: {
                "worker": st.worker, "added_at": st.added_at, "last_rx": st.last_rx, "connected": st.connected,
                "ever_connected": st.ever_connected, "disconnected_at": st.disconnected_at,
                "monitored": st.monitor is not None, "stale": st.stale, "unverified": st.unverified,
                "block_size_mismatch": st.mismatch, "now": now,
            } for st in self._streams.values()}

    def last_received(self, key: Any) -> float | None:
        """clock() of the last message received for an index key (None: never, or unknown key).
        Cheap (two dict reads): the sidecar calls it on every routing decision."""
        st = self._by_key.get(key)
        return None if st is None else st.last_rx

    def check_invariants(self) -> None:
        """Every buffered batch lies ahead of its stream's next_seq; byte counts and replay state agree."""
        with self.lock:
            for st in self._streams.values():
                assert all(s > st.next_seq for s in st.pending), f"{st.key!r}: buffered seq <= next {st.next_seq}"
                assert st.pending_bytes == sum(map(len, st.pending.values())), f"{st.key!r}: pending_bytes drifted"
                assert st.replay_deadline is None or st.dealer is not None, f"{st.key!r}: replay without a socket"
                assert self._by_key.get(st.key) is st

    def metrics(self) -> dict[str, Any]:
        """A plain-dict snapshot of every counter (names in ``docs/events.md``)."""
        with self.lock:
            out = self._m.snapshot()
            workers = {}
            for st in self._streams.values():
                workers[st.key] = {
                    "worker": st.worker,
                    "rank": st.rank,
                    "next_seq": st.next_seq,
                    "pending": len(st.pending),
                    "pending_bytes": st.pending_bytes,
                    "replaying": st.replay_deadline is not None,
                    "stale": st.stale,
                    "complete": st.complete,
                    "batches": st.batches,
                    "last_ts": st.last_ts,
                    "unverified": st.unverified,
                    "connected": st.connected,
                    "block_size_mismatch": st.mismatch,
                }
            out["workers"] = workers
            out["stale_workers"] = sum(1 for w in workers.values() if w["stale"])
        return out


#: Loop command name -> handler (commands are queued by ``add_worker``/``remove_worker``).
_COMMANDS: dict[str, Callable[..., None]] = {
    "add": KVEventSubscriber._cmd_add,
    "remove": KVEventSubscriber._cmd_remove,
}
