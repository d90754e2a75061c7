"""GIL waits beside back-to-back maximal routes, by ``CHAIN_CHUNK_BLOCKS`` and the yield between chunks.

One thread routes new 2**21-token prompts back to back (``Router.route``, 4 workers, compiled core);
the main thread sleeps 0.2 ms in a loop and records how late each sleep ends: how long another
thread of the same process (the sidecar's request loop) waits for the interpreter lock.  Chunk
sizes and yields side by side in one run; the chosen default is ``router.CHAIN_CHUNK_BLOCKS``
(issue 17, item 9; the end-to-end figure is bench/sidecar_stall.py).

    python bench/chain_chunks.py [--routes 25]
"""
from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from kvroute.router import Router
from kvroute.router import router as router_mod


def probe(route, n: int) -> tuple[float, list[float]]:
    done = threading.Event()

    def work() -> None:
        for i in range(n):
            route(i)
        done.set()

    lat = []
    th = threading.Thread(target=work)
    t0 = time.perf_counter()
    th.start()
    while not done.is_set():
        a = time.perf_counter()
        time.sleep(0.0002)
        lat.append(time.perf_counter() - a - 0.0002)
    th.join()
    lat.sort()
    return (time.perf_counter() - t0) / n, lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--routes", type=int, default=25)
    a = ap.parse_args()
    toks = np.random.default_rng(0).integers(0, 50_000, 1 << 21).astype("<u4")
    print(f"{'chunk':>8s} {'yield':>8s} {'route ms':>9s} {'wait p50':>9s} {'p99':>6s} {'p99.9':>6s} {'max ms':>7s}")
    for chunk in (1 << 40, 4096, 1024, 256):
        for y in (0.0, 5e-5):
            router_mod.CHAIN_CHUNK_BLOCKS = chunk
            r = Router([f"w{i}" for i in range(4)], 16)
            r.between_chunks = lambda y=y: time.sleep(y)

            def route(i: int, r=r) -> None:
                toks[0] = i  # a new prompt: its whole chain is new to the pending table
                r.route(toks, request_id=i)

            t, lat = probe(route, a.routes)
            q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1e3
            name = "whole" if chunk == 1 << 40 else str(chunk)
            print(f"{name:>8s} {y * 1e6:6.0f}us {t * 1e3:9.1f} {q(0.5):9.2f} {q(0.99):6.2f} {q(0.999):6.2f} {lat[-1] * 1e3:7.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
