"""How long one maximal route holds up every other client of ``kvroute serve`` (issue 17, item 9).

Three processes, as in a deployment: the server (``SidecarServer``, 4 workers), client A sending
maximal prompts (2**21 tokens, as uint32 bytes or as a msgpack int array; each a new prompt, so
each adds its 131,072-block chain to the speculative tables) back to back, and client B sending
small routes (256 tokens) + finishes in a closed loop, recording each route's round trip.
Separate processes keep A's packing off B's interpreter lock: what B sees is the server.

Server variants, side by side in one run (``--variants`` picks some):

* ``now``: the big-request thread, long chains added to the tables in chunks with the lock
  released between them (``CHAIN_CHUNK_BLOCKS``), int arrays decoded by the compiled core with
  the GIL released, big payloads not copied out of the ZMQ message;
* ``now+switch1ms`` / ``now+yield50us`` / ``now+lanenice5``: the same with
  ``sys.setswitchinterval(0.001)`` in the server, a 50 us sleep between chunks instead of
  ``time.sleep(0)``, or the big-request thread at nice +5 (tuning candidates);
* ``whole chains``: chains added whole and int arrays decoded by msgpack (``CHAIN_CHUNK_BLOCKS``
  and ``ARRAY_DECODE_BYTES`` out of reach: last session's state, but with this session's
  sharded pending table and zero-copy receive);
* ``single loop``: no big-request thread either (before issue 17).

``--approx``: the workers are in approximate mode (no KV events: decisions are also recorded in
the approximate table), else exact mode (``approximate = off``).  Reported: B's median, p99 and
max round trip while A runs, B's and A's routes, and the longest turn of the router's lock in the
server (the lock is wrapped to time each hold): its CPU time (the work one request does while the
others wait) and its wall time (CPU plus any time the holder was descheduled).

    python bench/sidecar_stall.py [--seconds 5] [--form bytes|list] [--approx]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import threading
import time

import msgpack
import numpy as np
import zmq

VARIANTS = {"now": {}, "now+lanenice5": {"lane_nice": 5}, "now+switch1ms": {"switch_ms": 1.0}, "now+yield50us": {"yield_us": 50}, "whole chains": {"chunked": False}, "single loop": {"chunked": False, "lane": False}}


class _TurnLock:
    """The router's lock, timing each turn (outermost acquire to release): wall time, and the holding
    thread's CPU time -- the work done per turn, which the scheduler cannot stretch (on 2 cores a
    thread holding the lock is sometimes descheduled for a time slice: wall >> CPU)."""

    def __init__(self) -> None:
        self._l = threading.RLock()
        self._tls = threading.local()
        self.turns: list[tuple[float, float]] = []  # (wall s, cpu s) of turns longer than 0.5 ms wall

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        ok = self._l.acquire(blocking, timeout)
        if ok:
            d = getattr(self._tls, "depth", 0)
            if not d:
                self._tls.t0, self._tls.c0 = time.perf_counter(), time.thread_time()
            self._tls.depth = d + 1
        return ok

    def release(self) -> None:
        self._tls.depth -= 1
        if not self._tls.depth:
            wall = time.perf_counter() - self._tls.t0
            if wall > 5e-4:
                self.turns.append((wall, time.thread_time() - self._tls.c0))
        self._l.release()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()

    def _is_owned(self) -> bool:
        return self._l._is_owned()


def _server(conn, chunked: bool, lane: bool, approx: bool, switch_ms: float, yield_us: float,
            lane_nice: int = 0) -> None:
    import os
    import sys

    if switch_ms:
        sys.setswitchinterval(switch_ms / 1e3)
    from kvroute.router import router as router_mod
    from kvroute.sidecar import server as server_mod
    from kvroute.sidecar import decode as decode_mod
    from kvroute.sidecar.config import SidecarConfig, WorkerConfig
    from kvroute.sidecar.server import SidecarServer

    if not chunked:
        router_mod.CHAIN_CHUNK_BLOCKS = 1 << 40
        decode_mod.ARRAY_DECODE_BYTES = 1 << 40
    if not lane:
        server_mod.BIG_REQUEST_BYTES = 1 << 40
    if lane_nice:  # the big-request thread at a lower CPU priority than the request loop
        run0 = server_mod._BigLane._run

        def run_niced(self):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), lane_nice)
            run0(self)

        server_mod._BigLane._run = run_niced
    if yield_us:
        router_mod.Router.between_chunks = staticmethod(lambda: time.sleep(yield_us / 1e6))
    cfg = SidecarConfig(bind="tcp://127.0.0.1:*", http_port=0, workers=[WorkerConfig(f"w{i}") for i in range(4)],
                        approximate="all" if approx else "off")
    srv = SidecarServer(cfg, context=zmq.Context())
    srv.lock = lock = _TurnLock()
    srv.start()
    conn.send(srv.address)
    threading.Thread(target=lambda: (conn.recv(), lock.turns.clear(), conn.recv(), srv.stop()), daemon=True).start()
    srv.serve_forever(poll_ms=20)
    turns = list(lock.turns)
    srv.close()
    conn.send(turns)


def _big_client(address: str, form: str, stop, done) -> None:
    """Packs one maximal prompt, then sends it back to back with its first token changed in place
    (a new prompt each time, at no packing cost: A's CPU stays off the shared cores)."""
    toks = np.random.default_rng(0).integers(0, 50_000, 1 << 21).astype("<u4")
    toks[0] = 1 << 20  # packed as uint32 in the int-array form: patchable in place
    body = toks.tobytes() if form == "bytes" else toks.tolist()
    payload = bytearray(msgpack.packb({"op": "route", "request_id": "big", "token_ids": body, "costs": False},
                                      use_bin_type=True))
    if form == "bytes":
        at = payload.index(b"\xc6" + (4 << 21).to_bytes(4, "big")) + 5
        patch = lambda i: payload.__setitem__(slice(at, at + 4), ((1 << 20) + i).to_bytes(4, "little"))
    else:
        at = payload.index(b"\xdd" + (1 << 21).to_bytes(4, "big")) + 5
        assert payload[at] == 0xCE
        patch = lambda i: payload.__setitem__(slice(at + 1, at + 5), ((1 << 20) + i).to_bytes(4, "big"))
    finish = msgpack.packb({"op": "finish", "request_id": "big"})
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    i = 0
    while not stop.is_set():
        patch(i)
        s.send_multipart([b"", payload])
        if s.poll(30_000):
            s.recv_multipart()
            s.send_multipart([b"", finish])
            s.poll(30_000) and s.recv_multipart()
            with done.get_lock():
                done.value += 1
        i += 1
    s.close()
    ctx.destroy(linger=0)


def run(seconds: float, form: str, approx: bool, chunked: bool = True, lane: bool = True, switch_ms: float = 0,
        yield_us: float = 0, lane_nice: int = 0) -> dict:
    mpc = mp.get_context("spawn")
    parent, child = mpc.Pipe()
    server = mpc.Process(target=_server, args=(child, chunked, lane, approx, switch_ms, yield_us, lane_nice), daemon=True)
    server.start()
    address = parent.recv()
    stop, done = mpc.Event(), mpc.Value("i", 0)
    big = mpc.Process(target=_big_client, args=(address, form, stop, done), daemon=True)
    ctx = zmq.Context()
    small = ctx.socket(zmq.DEALER)
    small.setsockopt(zmq.LINGER, 0)
    small.connect(address)
    p = np.random.default_rng(1).integers(0, 50_000, 256).astype("<u4").tobytes()

    def call(msg: dict) -> float:
        t0 = time.perf_counter()
        small.send_multipart([b"", msgpack.packb(msg)])
        if not small.poll(30_000):
            raise RuntimeError("no reply in 30 s")
        small.recv_multipart()
        return time.perf_counter() - t0

    for i in range(200):  # warm up (imports, first decisions) before A starts
        call({"op": "route", "request_id": -1 - i, "token_ids": p, "costs": False})
        call({"op": "finish", "request_id": -1 - i})
    big.start()
    while not done.value:  # A's first maximal route answered: the server has seen one
        time.sleep(0.05)
    lat = []
    parent.send("measure")  # the server's turn log starts here
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        lat.append(call({"op": "route", "request_id": i, "token_ids": p, "costs": False}))
        call({"op": "finish", "request_id": i})
        i += 1
    stop.set()
    big.join(60)
    parent.send("stop")
    turns = parent.recv() if parent.poll(60) else []
    server.join(30)
    small.close()
    ctx.destroy(linger=0)
    lat.sort()
    return {"small_routes": len(lat), "median_ms": statistics.median(lat) * 1e3,
            "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3, "max_ms": lat[-1] * 1e3, "big_routes": done.value,
            "turn_wall_max_ms": max((w for w, _ in turns), default=0.0) * 1e3,
            "turn_cpu_max_ms": max((c for _, c in turns), default=0.0) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--form", choices=("bytes", "list"), default="bytes")
    ap.add_argument("--approx", action="store_true", help="workers in approximate mode (no KV events)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    a = ap.parse_args()
    print(f"maximal prompts ({1 << 21} tokens as {a.form}) from client A; small routes from client B; "
          f"{'approximate' if a.approx else 'exact'} mode")
    print(f"{'server':14s} {'B routes':>9s} {'median ms':>10s} {'p99 ms':>8s} {'max ms':>8s} {'A routes':>9s} "
          f"{'longest turn: CPU ms':>21s} {'wall ms':>8s}")
    for name in a.variants.split(","):
        r = run(a.seconds, a.form, a.approx, **VARIANTS[name])
        print(f"{name:14s} {r['small_routes']:9d} {r['median_ms']:10.2f} {r['p99_ms']:8.2f} {r['max_ms']:8.2f} "
              f"{r['big_routes']:9d} {r['turn_cpu_max_ms']:21.2f} {r['turn_wall_max_ms']:8.2f}", flush=True)


if __name__ == "__main__":
    main()
