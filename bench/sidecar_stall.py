"""How long one maximal route holds up every other client of ``kvroute serve`` (issue 17, item 9).

Client A sends maximal prompts (2**21 tokens, as uint32 bytes or as a msgpack list) back to
back; client B sends small routes (256 tokens) + finishes in a closed loop and records each
round trip.  Run side by side in one process: with the big-request lane (the default) and
without it (``BIG_REQUEST_BYTES`` raised above any payload: the old single request loop).
Reported: B's median, p99 and max round trip while A runs, and A's requests answered.

    python bench/sidecar_stall.py [--seconds 5] [--form bytes|list]
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

import msgpack
import numpy as np
import zmq

from kvroute.sidecar import server as server_mod
from kvroute.sidecar.config import SidecarConfig, WorkerConfig
from kvroute.sidecar.server import SidecarServer
from kvroute.sidecar.service import MAX_TOKENS


def run(seconds: float, form: str, lane: bool) -> dict:
    saved = server_mod.BIG_REQUEST_BYTES
    if not lane:
        server_mod.BIG_REQUEST_BYTES = 1 << 40
    cfg = SidecarConfig(bind="tcp://127.0.0.1:*", http_port=0, workers=[WorkerConfig(f"w{i}") for i in range(4)])
    srv = SidecarServer(cfg, context=zmq.Context()).start()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_ms": 20}, daemon=True)
    t.start()
    ctx = zmq.Context()
    stop = threading.Event()
    big_done = [0]
    toks = np.random.default_rng(0).integers(0, 50_000, MAX_TOKENS).astype("<u4")
    body = toks.tobytes() if form == "bytes" else toks.tolist()

    def big_client() -> None:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(srv.address)
        i = 0
        while not stop.is_set():
            rid = f"big{i}"
            s.send_multipart([b"", msgpack.packb({"op": "route", "request_id": rid, "token_ids": body,
                                                  "costs": False}, use_bin_type=True)])
            if s.poll(30_000):
                s.recv_multipart()
                s.send_multipart([b"", msgpack.packb({"op": "finish", "request_id": rid})])
                s.poll(30_000) and s.recv_multipart()
                big_done[0] += 1
            i += 1
        s.close()

    small = ctx.socket(zmq.DEALER)
    small.setsockopt(zmq.LINGER, 0)
    small.connect(srv.address)
    p = np.random.default_rng(1).integers(0, 50_000, 256).astype("<u4").tobytes()
    lat = []
    bt = threading.Thread(target=big_client, daemon=True)
    bt.start()
    time.sleep(0.5)  # A's first request is in flight
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        t0 = time.perf_counter()
        small.send_multipart([b"", msgpack.packb({"op": "route", "request_id": i, "token_ids": p, "costs": False})])
        small.poll(30_000)
        small.recv_multipart()
        lat.append(time.perf_counter() - t0)
        small.send_multipart([b"", msgpack.packb({"op": "finish", "request_id": i})])
        small.poll(30_000)
        small.recv_multipart()
        i += 1
    stop.set()
    bt.join(60)
    small.close()
    ctx.destroy(linger=0)
    srv.stop()
    t.join(10)
    srv.close()
    server_mod.BIG_REQUEST_BYTES = saved
    lat.sort()
    return {"small_routes": len(lat), "median_ms": statistics.median(lat) * 1e3,
            "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3, "max_ms": lat[-1] * 1e3, "big_routes": big_done[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--form", choices=("bytes", "list"), default="bytes")
    a = ap.parse_args()
    print(f"maximal prompts ({MAX_TOKENS} tokens as {a.form}) from client A; small routes from client B")
    print(f"{'':24s} {'B routes':>9s} {'median ms':>10s} {'p99 ms':>8s} {'max ms':>8s} {'A routes':>9s}")
    for lane in (True, False):
        r = run(a.seconds, a.form, lane)
        name = "big-request lane" if lane else "single loop (before)"
        print(f"{name:24s} {r['small_routes']:9d} {r['median_ms']:10.2f} {r['p99_ms']:8.2f} {r['max_ms']:8.2f} "
              f"{r['big_routes']:9d}")


if __name__ == "__main__":
    main()
